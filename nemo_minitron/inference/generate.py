"""Incremental decoding with a KV cache on a TP/PP Megatron model.

    >>> runner = ModelRunner(build_gpt_model(cfg), cfg)      # + weights
    >>> tok = load_tokenizer(hf_dir)
    >>> out = generate(runner, [tok.encode("The capital of"), tok.encode("x")],
    ...                SamplingParams(greedy=True, max_new_tokens=16), tokenizer=tok)
    >>> out[0].text, out[0].finish_reason

Prompts of different lengths are right-aligned to nothing: each keeps its true positions
0..len-1 (as transformers without padding would see it) by the scheme of Megatron's static text
generation. The first step pre-fills the cache with the first ``min(len)`` tokens of every prompt;
after that, one position per step for the whole batch: a sequence still inside its prompt is fed
its next prompt token (the sampled one is discarded), the others their sampled token. No padding
token ever enters the cache of a live sequence, so no attention mask is needed (Megatron's causal
mask for the pre-fill, no mask for one-token steps), and RoPE positions are exact.

All ranks hold the same token buffer [b, T]; only the sampler rank (last stage, TP rank 0) samples,
and a [b, 3] float64 packet (token, its log-probability, finish code) broadcast from it keeps every
rank in step and lets all of them stop at the same step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from nemo_minitron.errors import MinitronError
from nemo_minitron.inference.runner import ModelRunner
from nemo_minitron.inference.sampling import SamplingParams, next_tokens

# finish codes carried in the broadcast packet
_RUNNING, _EOS, _STOP, _LENGTH = 0, 1, 2, 3
FINISH_REASONS = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}


class GenerationError(MinitronError, ValueError):
    """A prompt or sampling request that cannot be served (detected before any forward)."""


@dataclass
class Completion:
    prompt_ids: List[int]
    tokens: List[int]  # generated ids, including a final eos if it ended on one
    finish_reason: str  # "eos", "stop" (a stop string appeared) or "length" (max_new_tokens)
    logprobs: Optional[List[float]] = None  # model log-probability of each generated token
    text: Optional[str] = None  # decoded completion (special tokens skipped, cut before a stop string)


def eos_ids(cfg) -> tuple:
    return tuple(cfg.eos_token_id) if isinstance(cfg.eos_token_id, (tuple, list)) \
        else (cfg.eos_token_id,)


def validate_request(cfg, prompts: Sequence[Sequence[int]], params: SamplingParams,
                     tokenizer=None) -> None:
    """Raise :class:`GenerationError` naming the first problem; cheap, before any forward."""
    if not prompts:
        raise GenerationError("no prompts given")
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise GenerationError(f"prompt {i} is empty (no tokens)")
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)]
        if bad:
            raise GenerationError(f"prompt {i} has token id(s) outside [0, {cfg.vocab_size}): "
                                  f"{bad[:5]}")
        total = len(ids) + params.max_new_tokens
        if total > cfg.max_position_embeddings:
            raise GenerationError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                f"that exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
    if params.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer")


def _stop_hit(text: str, stop: Sequence[str]) -> Optional[int]:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


@torch.no_grad()
def generate(runner: ModelRunner, prompts: Sequence[Sequence[int]], params: SamplingParams,
             tokenizer=None) -> List[Completion]:
    """Complete each prompt (token ids, BOS included as the tokenizer adds it); every rank of the
    model-parallel group must call this with the same arguments, and all get the same result."""
    prompts = [[int(t) for t in p] for p in prompts]
    validate_request(runner.cfg, prompts, params, tokenizer)
    device = runner.device
    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [b]
    total = int((lens + params.max_new_tokens).max())  # T: positions any sequence may reach
    eos = torch.tensor(eos_ids(runner.cfg), device=device)
    # [b, T]; the filler 0 is only ever fed after a sequence has finished (its output unused)
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=device)
    logprobs = torch.zeros(b, total, dtype=torch.float32, device=device)  # [b, T]
    finish = torch.zeros(b, dtype=torch.long, device=device)  # finish code per sequence
    end = torch.zeros(b, dtype=torch.long, device=device)  # one past each last generated token
    generator = None
    if runner.is_sampler and not params.is_greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    cache = runner.new_cache(b, total)
    pos = int(lens.min())  # index of the token the next forward predicts
    step_input = tokens[:, :pos]  # pre-fill: the first min(len) tokens of every prompt
    while True:
        logits = runner.last_logits(step_input, cache)  # [b, vocab] on the last stage
        packet = torch.zeros(b, 3, dtype=torch.float64, device=device)  # (token, logprob, code)
        if runner.is_sampler:
            sampled, lp = next_tokens(logits, params, generator)
            generating = (pos >= lens) & (finish == _RUNNING)  # [b]
            chosen = torch.where(generating, sampled, tokens[:, pos])
            code = torch.zeros(b, dtype=torch.long, device=device)
            if not params.ignore_eos:
                code[generating & torch.isin(chosen, eos)] = _EOS
            if params.stop:
                for i in torch.nonzero(generating & (code == _RUNNING)).flatten().tolist():
                    completion = tokens[i, int(lens[i]):pos].tolist() + [int(chosen[i])]
                    if _stop_hit(_decode(tokenizer, completion), params.stop) is not None:
                        code[i] = _STOP
            at_limit = generating & (pos + 1 - lens >= params.max_new_tokens) & (code == _RUNNING)
            code[at_limit] = _LENGTH
            packet[:, 0], packet[:, 1], packet[:, 2] = chosen.double(), lp.double(), code.double()
        runner.broadcast_from_sampler(packet)
        live = finish == _RUNNING  # finished sequences keep their buffer as it is
        tokens[:, pos] = torch.where(live, packet[:, 0].long(), tokens[:, pos])
        logprobs[:, pos] = torch.where(live, packet[:, 1].float(), logprobs[:, pos])
        finish = torch.where(live, packet[:, 2].long(), finish)
        end = torch.where(live & (finish != _RUNNING), pos + 1, end)
        if bool((finish != _RUNNING).all()):
            break
        if pos + 1 >= total:  # cannot happen: the length limit finishes every sequence by T-1
            raise RuntimeError("generation ran past its token buffer")
        step_input = tokens[:, pos : pos + 1]  # [b, 1]
        pos += 1

    results = []
    for i, p in enumerate(prompts):
        n, e = len(p), int(end[i])
        new = tokens[i, n:e].tolist()
        completion = Completion(prompt_ids=p, tokens=new,
                                finish_reason=FINISH_REASONS[int(finish[i])],
                                logprobs=logprobs[i, n:e].tolist() if params.logprobs else None)
        if tokenizer is not None:
            text = _decode(tokenizer, new)
            cut = _stop_hit(text, params.stop) if params.stop else None
            completion.text = text if cut is None else text[:cut]
        results.append(completion)
    return results
