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
and a [b, 3 + 2k] float64 packet (token, its log-probability, finish code, and the k most likely
alternatives with theirs when top log-probabilities are asked) broadcast from it keeps every rank
in step and lets all of them stop at the same step. Each row may have its own SamplingParams (the
server batches independent requests into one call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

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
    # per generated token, its params.top_logprobs most likely (id, logprob), most likely first
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None


class StepEvent(NamedTuple):
    """One newly generated token of row ``row`` (what ``generate(on_step=...)`` receives)."""
    row: int
    token: int
    logprob: float  # the model's log-probability of ``token``
    top: Optional[List[Tuple[int, float]]]  # its top_logprobs alternatives, if asked
    finish_reason: Optional[str]  # None while the row goes on


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


def _per_row(params, b: int, groups) -> Tuple[List[SamplingParams], List[int]]:
    """(SamplingParams of each row, sampling group of each row); see :func:`generate`."""
    if isinstance(params, SamplingParams):
        rows, default_groups = [params] * b, [0] * b
    else:
        rows, default_groups = list(params), list(range(b))
        if len(rows) != b or not all(isinstance(p, SamplingParams) for p in rows):
            raise GenerationError(f"params: one SamplingParams, or a list of {b} (one per prompt)")
    groups = default_groups if groups is None else [int(g) for g in groups]
    if len(groups) != b:
        raise GenerationError(f"groups: {len(groups)} group ids for {b} prompts")
    for i, g in enumerate(groups):  # a group shares one generator, so it needs one seed
        first = groups.index(g)
        if rows[i].seed != rows[first].seed or rows[i].is_greedy != rows[first].is_greedy:
            raise GenerationError(f"prompts {first} and {i} share sampling group {g} but not "
                                  "its seed and greedy flag")
    return rows, groups


@torch.no_grad()
def generate(runner: ModelRunner, prompts: Sequence[Sequence[int]],
             params: Union[SamplingParams, Sequence[SamplingParams]], tokenizer=None,
             groups: Optional[Sequence[int]] = None,
             on_step: Optional[Callable[[List[StepEvent]], None]] = None) -> List[Completion]:
    """Complete each prompt (token ids, BOS included as the tokenizer adds it); every rank of the
    model-parallel group must call this with the same arguments, and all get the same result.

    ``params`` is one :class:`SamplingParams` for all prompts, or one per prompt (the server's
    batch of independent requests). ``groups`` (one id per prompt; default: all one group for a
    single ``params``, else one group per prompt) says which rows share a sampling generator,
    seeded by the group's seed. A group draws only at the steps where one of its rows is live and
    every one of its prompts has been pre-filled, so its samples do not depend on what else is in
    the batch: a request batched with others gets the tokens it would get alone.
    ``on_step(events)`` (optional, any rank) sees each step's newly generated tokens as they come.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise GenerationError("no prompts given")
    b = len(prompts)
    rows, groups = _per_row(params, b, groups)
    if isinstance(params, SamplingParams):
        validate_request(runner.cfg, prompts, params, tokenizer)
    else:
        for i, (p, ps) in enumerate(zip(prompts, rows)):
            try:
                validate_request(runner.cfg, [p], ps, tokenizer)
            except GenerationError as e:  # name the row, not "prompt 0"
                raise GenerationError(str(e).replace("prompt 0", f"prompt {i}", 1)) from None
    device = runner.device
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [b]
    max_new = torch.tensor([ps.max_new_tokens for ps in rows], device=device)  # [b]
    total = int((lens + max_new).max())  # T: positions any sequence may reach
    eos = torch.tensor(eos_ids(runner.cfg), device=device)
    may_eos = torch.tensor([not ps.ignore_eos for ps in rows], device=device)  # [b]
    k_top = max(ps.top_logprobs for ps in rows)  # alternatives reported per step (<= 5)
    # [b, T]; the filler 0 is only ever fed after a sequence has finished (its output unused)
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=device)
    logprobs = torch.zeros(b, total, dtype=torch.float32, device=device)  # [b, T]
    top = torch.zeros(b, total, 2 * k_top, dtype=torch.float64, device=device)  # (ids, logps)
    finish = torch.zeros(b, dtype=torch.long, device=device)  # finish code per sequence
    end = torch.zeros(b, dtype=torch.long, device=device)  # one past each last generated token
    # group id -> (row indices, params, generator, first position it samples at)
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    sampling = {}
    for g, idx in members.items():
        ps = rows[idx[0]]
        generator = None
        if runner.is_sampler and not ps.is_greedy:
            generator = torch.Generator(device=device).manual_seed(ps.seed)
        sampling[g] = (torch.tensor(idx, device=device), generator,
                       min(len(prompts[i]) for i in idx))

    cache = runner.new_cache(b, total)
    pos = int(lens.min())  # index of the token the next forward predicts
    step_input = tokens[:, :pos]  # pre-fill: the first min(len) tokens of every prompt
    while True:
        logits = runner.last_logits(step_input, cache)  # [b, vocab] on the last stage
        # (token, logprob, finish code, k_top alternative ids, their logprobs) per row
        packet = torch.zeros(b, 3 + 2 * k_top, dtype=torch.float64, device=device)
        if runner.is_sampler:
            sampled = torch.zeros(b, dtype=torch.long, device=device)
            lp = torch.zeros(b, dtype=torch.float32, device=device)
            for g, (idx, generator, first_pos) in sampling.items():
                if pos < first_pos or not bool((finish[idx] == _RUNNING).any()):
                    continue  # this group draws nothing now (as when it runs alone)
                sampled[idx], lp[idx] = next_tokens(logits[idx], rows[int(idx[0])], generator)
            generating = (pos >= lens) & (finish == _RUNNING)  # [b]
            chosen = torch.where(generating, sampled, tokens[:, pos])
            code = torch.zeros(b, dtype=torch.long, device=device)
            code[generating & may_eos & torch.isin(chosen, eos)] = _EOS
            for i in torch.nonzero(generating & (code == _RUNNING)).flatten().tolist():
                if rows[i].stop:
                    completion = tokens[i, int(lens[i]):pos].tolist() + [int(chosen[i])]
                    if _stop_hit(_decode(tokenizer, completion), rows[i].stop) is not None:
                        code[i] = _STOP
            at_limit = generating & (pos + 1 - lens >= max_new) & (code == _RUNNING)
            code[at_limit] = _LENGTH
            packet[:, 0], packet[:, 1], packet[:, 2] = chosen.double(), lp.double(), code.double()
            if k_top:
                alt_lp, alt_ids = logits.log_softmax(-1).topk(k_top, dim=-1)  # [b, k_top]
                packet[:, 3:3 + k_top], packet[:, 3 + k_top:] = alt_ids.double(), alt_lp.double()
        runner.broadcast_from_sampler(packet)
        live = finish == _RUNNING  # finished sequences keep their buffer as it is
        new = live & (pos >= lens)  # rows that generated a token at this step
        tokens[:, pos] = torch.where(live, packet[:, 0].long(), tokens[:, pos])
        logprobs[:, pos] = torch.where(live, packet[:, 1].float(), logprobs[:, pos])
        if k_top:
            top[:, pos] = torch.where(live.unsqueeze(-1), packet[:, 3:], top[:, pos])
        finish = torch.where(live, packet[:, 2].long(), finish)
        end = torch.where(live & (finish != _RUNNING), pos + 1, end)
        if on_step is not None and bool(new.any()):
            on_step([StepEvent(i, int(tokens[i, pos]), float(logprobs[i, pos]),
                               _alternatives(top[i, pos], rows[i].top_logprobs),
                               FINISH_REASONS.get(int(finish[i])))
                     for i in torch.nonzero(new).flatten().tolist()])
        if bool((finish != _RUNNING).all()):
            break
        if pos + 1 >= total:  # cannot happen: the length limit finishes every sequence by T-1
            raise RuntimeError("generation ran past its token buffer")
        step_input = tokens[:, pos : pos + 1]  # [b, 1]
        pos += 1

    results = []
    for i, p in enumerate(prompts):
        n, e, ps = len(p), int(end[i]), rows[i]
        new_ids = tokens[i, n:e].tolist()
        completion = Completion(prompt_ids=p, tokens=new_ids,
                                finish_reason=FINISH_REASONS[int(finish[i])],
                                logprobs=logprobs[i, n:e].tolist() if ps.logprobs else None)
        if ps.logprobs and ps.top_logprobs:
            completion.top_logprobs = [_alternatives(top[i, t], ps.top_logprobs)
                                       for t in range(n, e)]
        if tokenizer is not None:
            text = _decode(tokenizer, new_ids)
            cut = _stop_hit(text, ps.stop) if ps.stop else None
            completion.text = text if cut is None else text[:cut]
        results.append(completion)
    return results


def _alternatives(row: torch.Tensor, k: int) -> Optional[List[Tuple[int, float]]]:
    """The k most likely (id, logprob) of one step from its packet columns [2 * k_top]."""
    if not k:
        return None
    k_top = row.shape[0] // 2
    return [(int(row[j]), float(row[k_top + j])) for j in range(k)]
