"""``nemo-minitron verify HF_DIR IN.nemo``: the .nemo's Megatron model against transformers.

Both models run in fp32 on the same token ids (prompts from ``--prompts`` (JSONL with ``prompt``
or plain text, one per line) or built-in English prose from Python's documentation, tokenized with
the HF directory's tokenizer, BOS first). Reported per prompt and overall: max |delta logit|, the
lowest cosine similarity of two logit vectors at a position, and top-1 agreement. Exit status 1
when max |delta| exceeds ``--atol``.

The Megatron side runs in this process, in a one-rank world set up for it and torn down after
(``dist.one_rank_world``; an error inside a multi-rank process group).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from nemo_minitron.errors import CheckpointError, ConfigError


@dataclass
class PromptResult:
    tokens: int
    max_abs_diff: float
    min_cosine: float
    top1_agreement: float


def _prompts(path: Optional[str]) -> List[str]:
    if path is None:
        from pydoc_data.topics import topics

        return [topics[k][:400] for k in ("while", "assert", "lambda")]
    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path}: file not found")
    if path.endswith(".jsonl"):
        from nemo_minitron.data.jsonl import iter_jsonl

        prompts = [r["prompt"] for _, r in iter_jsonl(path, ("prompt",))]
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts")
    return prompts


def _megatron_logits(cfg, nemo_path: str, ids: List[List[int]]) -> List[torch.Tensor]:
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.model.load import load_nemo_into_model

    model = build_gpt_model(cfg, dtype="float32", use_te=False)
    load_nemo_into_model(model, cfg, nemo_path)
    model.eval()
    device = next(model.parameters()).device  # a GPU where CUDA is (the CPU shim only without)
    return [full_logits(model, torch.tensor([seq], device=device), cfg.vocab_size)[0].float().cpu()
            for seq in ids]


def compare(a: torch.Tensor, b: torch.Tensor) -> PromptResult:
    """a, b: [tokens, vocab] fp32 logits."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return PromptResult(tokens=a.shape[0], max_abs_diff=(a - b).abs().max().item(),
                        min_cosine=cos.min().item(),
                        top1_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item())


def verify(hf_dir: str, nemo_path: str, prompts: Optional[str] = None) -> List[PromptResult]:
    try:
        import transformers
    except ImportError:
        raise ConfigError("verify needs transformers >= 4.45 (pip install 'transformers>=4.45')") \
            from None
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.convert.nemo_file import opened_nemo
    from nemo_minitron.convert.nemo_to_hf import read_config
    from nemo_minitron.dist import compute_device, one_rank_world

    hf_cfg = read_hf_config(hf_dir)
    with opened_nemo(nemo_path) as root:
        cfg = read_config(root, nemo_path)
    if hf_cfg.replace(dtype=cfg.dtype) != cfg:
        raise CheckpointError(f"{hf_dir} and {nemo_path} describe different architectures")
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        raise CheckpointError(f"{hf_dir}: no tokenizer.json to tokenize the prompts")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = [tokenizer(p)["input_ids"][: cfg.max_position_embeddings] for p in _prompts(prompts)]
    with one_rank_world(megatron=True):
        megatron = _megatron_logits(cfg, nemo_path, ids)
    device = compute_device()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = model.to(device).eval()
    with torch.no_grad():
        reference = [model(torch.tensor([seq], device=device)).logits[0].float().cpu()
                     for seq in ids]
    del model
    return [compare(m, r) for m, r in zip(megatron, reference)]


def report(results: List[PromptResult], atol: float) -> str:
    lines = [f"{'prompt':>6} {'tokens':>6} {'max|dlogit|':>12} {'min cos':>10} {'top-1':>7}"]
    for i, r in enumerate(results):
        lines.append(f"{i:>6} {r.tokens:>6} {r.max_abs_diff:>12.3e} {r.min_cosine:>10.7f} "
                     f"{r.top1_agreement:>7.2%}")
    worst = max(r.max_abs_diff for r in results)
    tokens = sum(r.tokens for r in results)
    top1 = sum(r.top1_agreement * r.tokens for r in results) / tokens
    verdict = "PASS" if worst <= atol else "FAIL"
    lines.append(f"{verdict}: max |delta logit| {worst:.3e} (atol {atol:g}), min cosine "
                 f"{min(r.min_cosine for r in results):.7f}, top-1 agreement {top1:.2%} over "
                 f"{tokens} tokens")
    return "\n".join(lines)
