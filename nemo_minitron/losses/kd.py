"""Logit distillation losses over vocab-parallel logits (Megatron TP), chunked over tokens.

Forward KL (the Minitron recipe, shared/FACTS.md section 5):
    KL(p_t || p_s) = sum_v p_t(v) * (log p_t(v) - log p_s(v)),  p = softmax(logits / T)
Reverse KL swaps the roles: KL(p_s || p_t).

Under tensor parallelism each rank holds logits for a contiguous slice of the (padded) vocabulary,
``[tokens, vocab/TP]``. The softmax normalisers need the max and the sum of exponentials over the
whole vocabulary: an all-reduce MAX and an all-reduce SUM per softmax, plus one SUM for the
per-token KL. No rank ever materialises the full vocabulary.

Memory: the work is done ``chunk_tokens`` tokens at a time, so fp32 temporaries are
``[chunk_tokens, vocab/TP]`` however long the sequence. The gradient w.r.t. the student logits is
computed in the same pass (per token, before the T^2 scale):
    forward KL:  (p_s - p_t) / T
    reverse KL:  p_s * (log p_s - log p_t - KL(p_s || p_t)) / T
and stored until backward, which only scales it by the incoming per-token gradient. With
``reuse_teacher_logits=True`` it is stored *in the teacher logits tensor* (which the caller must not
need afterwards, as in distillation where they exist only for this loss), so the loss adds no
``[tokens, vocab]`` buffer at all -- the same trick Megatron's vocab-parallel cross entropy plays on
its logits. The teacher receives no gradient. Padded vocabulary ids (Megatron pads to a multiple of
divisor * TP) are excluded through ``vocab_size``: they get no probability and zero gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _tp(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def _log_softmax(x: torch.Tensor, group) -> torch.Tensor:
    """log softmax over a vocabulary split across ``group``; x [n, v_local] fp32 (v_local may be 0)."""
    if not _tp(group):
        return torch.log_softmax(x, dim=-1)
    m = (x.max(dim=-1, keepdim=True).values if x.shape[-1]
         else x.new_full((x.shape[0], 1), float("-inf")))
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    x = x - m
    s = x.exp().sum(dim=-1, keepdim=True)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return x - s.log()


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, reverse, group, valid, chunk, reuse_teacher):
        n = student.shape[0]
        kl = torch.empty(n, dtype=torch.float32, device=student.device)
        if reuse_teacher and teacher.dtype == student.dtype and teacher.is_contiguous():
            grad = teacher  # overwritten chunk by chunk, after each chunk's teacher rows are read
        else:
            grad = torch.empty_like(student)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            log_ps = _log_softmax(student[a:b, :valid].float() / temperature, group)
            log_pt = _log_softmax(teacher[a:b, :valid].float() / temperature, group)
            ps = log_ps.exp()
            if reverse:
                diff = log_ps - log_pt
                kl_chunk = (ps * diff).sum(dim=-1)
            else:
                pt = log_pt.exp()
                kl_chunk = (pt * (log_pt - log_ps)).sum(dim=-1)
            if _tp(group):
                dist.all_reduce(kl_chunk, op=dist.ReduceOp.SUM, group=group)
            kl[a:b] = kl_chunk
            g = ps * (diff - kl_chunk[:, None]) if reverse else ps - pt
            grad[a:b, :valid] = g.to(grad.dtype)
            grad[a:b, valid:] = 0
        ctx.save_for_backward(grad)
        ctx.temperature = temperature
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        # One backward per forward: the stored gradient is scaled in place.
        grad.mul_((grad_kl / ctx.temperature)[:, None].to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float = 1.0, reverse: bool = False,
                      loss_mask: Optional[torch.Tensor] = None, group=None,
                      vocab_start: int = 0, vocab_size: Optional[int] = None,
                      chunk_tokens: int = 128, scale_by_t2: bool = True,
                      reuse_teacher_logits: bool = False) -> torch.Tensor:
    """Mean KL over the unmasked tokens (a scalar), times T^2 when ``scale_by_t2``.

    ``student_logits``, ``teacher_logits``: ``[..., vocab/TP]`` (any leading shape, e.g. [s, b] or
    [b, s]); this rank's vocabulary slice starts at global id ``vocab_start``. ``group``: the
    tensor-parallel process group (None: the whole vocabulary is local). ``vocab_size``: the real
    vocabulary (padded ids are excluded). ``loss_mask``: leading shape, 1 = token counts.
    ``reuse_teacher_logits``: store the gradient in the teacher logits (they are overwritten).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {list(student_logits.shape)} and teacher logits "
                         f"{list(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    v = student_logits.shape[-1]
    valid = v if vocab_size is None else max(0, min(v, vocab_size - vocab_start))
    s, t = student_logits.reshape(-1, v), teacher_logits.detach().reshape(-1, v)
    kl = _VocabParallelKL.apply(s, t, float(temperature), bool(reverse), group, valid,
                                max(1, int(chunk_tokens)), bool(reuse_teacher_logits))
    if loss_mask is None:
        loss = kl.mean()
    else:
        m = loss_mask.reshape(-1).to(kl.dtype)
        loss = (kl * m).sum() / m.sum().clamp(min=1.0)
    return loss * (temperature ** 2 if scale_by_t2 else 1.0)
