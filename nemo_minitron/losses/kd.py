"""Logit distillation losses over vocab-parallel logits (Megatron TP), chunked over tokens.

Forward KL (the Minitron recipe, shared/FACTS.md section 5):
    KL(p_t || p_s) = sum_v p_t(v) * (log p_t(v) - log p_s(v)),  p = softmax(logits / T)
Reverse KL swaps the roles: KL(p_s || p_t).

Under tensor parallelism each rank holds logits for a contiguous slice of the (padded) vocabulary,
``[tokens, vocab/TP]``. The softmax normalisers need the max and the sum of exponentials over the
whole vocabulary: two all-reduces (MAX, then SUM) per softmax, plus one SUM for the per-token KL.
No rank ever materialises the full vocabulary. Work is done ``chunk_tokens`` tokens at a time, so
the temporaries are ``[chunk_tokens, vocab/TP]`` however long the sequence is; the backward pass
recomputes them per chunk (a custom autograd function) instead of keeping them.

Gradient w.r.t. the student logits (per token, before the T^2 scale):
    forward KL:  (p_s - p_t) / T
    reverse KL:  p_s * (log p_s - log p_t - KL(p_s || p_t)) / T
The teacher receives no gradient. Padded vocabulary rows (Megatron pads to a multiple of
divisor * TP) must be excluded by the caller through ``vocab_size`` so they never take probability.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _log_softmax_parallel(logits: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the vocabulary split across ``group``; logits [n, v_local] fp32."""
    m = logits.max(dim=-1, keepdim=True).values
    m = _all_reduce(m, dist.ReduceOp.MAX, group)
    shifted = logits - m
    s = shifted.exp().sum(dim=-1, keepdim=True)
    s = _all_reduce(s, dist.ReduceOp.SUM, group)
    return shifted - s.log()


def _mask_padded(logits: torch.Tensor, vocab_start: int, vocab_size: Optional[int]) -> torch.Tensor:
    """Set the logits of padded vocabulary rows (global id >= vocab_size) to -inf."""
    if vocab_size is None or vocab_start + logits.shape[-1] <= vocab_size:
        return logits
    keep = max(0, vocab_size - vocab_start)
    out = logits.clone()
    out[..., keep:] = float("-inf")
    return out


def _chunk_terms(s, t, temperature, reverse, group, vocab_start, vocab_size):
    """Per-token KL [n] and the pieces backward needs, for one chunk of fp32 logits [n, v_local]."""
    s = _mask_padded(s.float() / temperature, vocab_start, vocab_size)
    t = _mask_padded(t.float() / temperature, vocab_start, vocab_size)
    log_ps, log_pt = _log_softmax_parallel(s, group), _log_softmax_parallel(t, group)
    # 0 * -inf on padded rows -> nan; those rows contribute exactly 0 (p = 0).
    if reverse:
        p, diff = log_ps.exp(), log_ps - log_pt
    else:
        p, diff = log_pt.exp(), log_pt - log_ps
    contrib = torch.where(p > 0, p * diff, torch.zeros_like(p))
    kl = _all_reduce(contrib.sum(dim=-1), dist.ReduceOp.SUM, group)
    return kl, log_ps, log_pt


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, reverse, group, vocab_start, vocab_size,
                chunk_tokens):
        n = student.shape[0]
        kl = student.new_empty(n, dtype=torch.float32)
        with torch.no_grad():
            for a in range(0, n, chunk_tokens):
                kl[a:a + chunk_tokens] = _chunk_terms(
                    student[a:a + chunk_tokens], teacher[a:a + chunk_tokens], temperature, reverse,
                    group, vocab_start, vocab_size)[0]
        ctx.save_for_backward(student, teacher, kl)
        ctx.args = (temperature, reverse, group, vocab_start, vocab_size, chunk_tokens)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, kl = ctx.saved_tensors
        temperature, reverse, group, vocab_start, vocab_size, chunk_tokens = ctx.args
        grad = torch.empty_like(student)
        for a in range(0, student.shape[0], chunk_tokens):
            b = a + chunk_tokens
            _, log_ps, log_pt = _chunk_terms(student[a:b], teacher[a:b], temperature, reverse,
                                             group, vocab_start, vocab_size)
            ps = log_ps.exp()
            if reverse:
                diff = torch.where(ps > 0, log_ps - log_pt, torch.zeros_like(ps))
                g = ps * (diff - kl[a:b, None])
            else:
                g = ps - log_pt.exp()
            grad[a:b] = (g * (grad_kl[a:b, None] / temperature)).to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float = 1.0, reverse: bool = False,
                      loss_mask: Optional[torch.Tensor] = None, group=None,
                      vocab_start: int = 0, vocab_size: Optional[int] = None,
                      chunk_tokens: int = 1024, scale_by_t2: bool = True) -> torch.Tensor:
    """Mean KL over the unmasked tokens (a scalar), times T^2 when ``scale_by_t2``.

    ``student_logits``, ``teacher_logits``: ``[..., vocab/TP]`` (any leading shape, e.g. [s, b] or
    [b, s]); this rank's vocabulary slice starts at global id ``vocab_start``. ``group``: the
    tensor-parallel process group (None: the full vocabulary is local). ``vocab_size``: the real
    vocabulary (padded ids are excluded). ``loss_mask``: leading shape, 1 = token counts.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {list(student_logits.shape)} and teacher logits "
                         f"{list(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    v = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, v), teacher_logits.detach().reshape(-1, v)
    kl = _VocabParallelKL.apply(s, t, float(temperature), bool(reverse), group, int(vocab_start),
                                vocab_size, int(chunk_tokens))
    if loss_mask is None:
        loss = kl.mean()
    else:
        m = loss_mask.reshape(-1).to(kl.dtype)
        loss = (kl * m).sum() / m.sum().clamp(min=1.0)
    return loss * (temperature ** 2 if scale_by_t2 else 1.0)
