"""One forward pass of a micro-batch through a (possibly pipelined) Megatron GPTModel, no grad.

Every rank calls :func:`stage_forward` with the same token ids. Under PP the stages run in order:
stage k > 0 receives the hidden states ``[seq, batch, hidden]`` (Megatron is sequence-first) from
stage k-1, stage k < PP-1 sends its output on; each TP rank talks to the same TP rank of the
neighbouring stage. Only the last stage returns something: the per-token LM loss ``[batch, seq]``
when ``labels`` are given (vocab-parallel cross entropy: identical on every TP rank), else the
logits (vocab-parallel under TP unless the model was built with ``parallel_output=False``).
"""
from __future__ import annotations

from typing import Optional

import torch


def stage_forward(model, ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
    """``ids`` ``[batch, seq]`` (int64); returns the last stage's output, None on other stages."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    batch, seq = ids.shape
    pos = torch.arange(seq, device=ids.device).unsqueeze(0).expand(batch, -1)
    pipelined = ps.get_pipeline_model_parallel_world_size() > 1
    with torch.no_grad():
        if pipelined and not ps.is_pipeline_first_stage():
            hidden = torch.empty((seq, batch, model.config.hidden_size),
                                 dtype=model.config.params_dtype, device=ids.device)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, pos, None, labels=labels)
        if pipelined and not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
    return out


def full_logits(model, ids: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """Logits ``[batch, seq, vocab_size]`` over the whole (unpadded) vocabulary on every TP rank of
    the last stage (the vocab shards gathered, Megatron's padding sliced off); None elsewhere."""
    from megatron.core import tensor_parallel

    out = stage_forward(model, ids)
    if out is None:
        return None
    return tensor_parallel.gather_from_tensor_model_parallel_region(out)[..., :vocab_size]
