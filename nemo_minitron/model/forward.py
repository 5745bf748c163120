"""One forward pass of a micro-batch through a (possibly pipelined) Megatron GPTModel, no grad.

Every rank calls :func:`stage_forward` with the same token ids. Under PP the stages run in order:
stage k > 0 receives the hidden states ``[seq, batch, hidden]`` (Megatron is sequence-first) from
stage k-1, stage k < PP-1 sends its output on; each TP rank talks to the same TP rank of the
neighbouring stage. Only the last stage returns something: the per-token LM loss ``[batch, seq]``
when ``labels`` are given (vocab-parallel cross entropy: identical on every TP rank), else the
logits (vocab-parallel under TP unless the model was built with ``parallel_output=False``).
"""
from __future__ import annotations

import contextlib
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


# ---- logits on the counted tokens only (training losses) ----------------------------------------
def counted_index(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices into Megatron's sequence-first ``[s*b]`` of the tokens ``loss_mask`` ``[b, s]``
    counts; at least one (index 0, a token the mask then weighs 0) so no tensor is empty."""
    idx = loss_mask.t().reshape(-1).nonzero().squeeze(1)
    return idx if idx.numel() else idx.new_zeros(1)


def select_counted(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` -> ``[1, n]``: the counted tokens' values, in :func:`counted_index` order."""
    return t.t().reshape(-1)[index].unsqueeze(0)


@contextlib.contextmanager
def logits_at(model, index: torch.Tensor):
    """Within: the (last stage's) output layer sees only the hidden states at ``index``, so
    ``model(...)`` without labels returns logits ``[1, n, vocab/TP]`` for those n tokens instead of
    ``[b, s, vocab/TP]``: no LM-head matmul (V = 128256 columns) on padding or prompt positions.
    A forward pre-hook ``[s, b, h] -> [n, 1, h]``; a no-op on stages without an output layer."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model

    if not ps.is_pipeline_last_stage():
        yield
        return
    layer = get_attr_wrapped_model(model, "output_layer")

    def pick(module, args, kwargs):
        hidden = args[0]  # [s, b, h]
        picked = hidden.reshape(-1, hidden.shape[-1])[index].unsqueeze(1)  # [n, 1, h]
        return (picked,) + tuple(args[1:]), kwargs

    handle = layer.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def counted_lm_loss(model, batch) -> torch.Tensor:
    """Per-token LM loss ``[b, s]`` (zero where ``loss_mask`` is 0) with logits computed on the
    counted tokens only; on a non-last pipeline stage, the ``[s, b, h]`` activations."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model

    from nemo_minitron.model.attention import attention_mask_for

    index = counted_index(batch["loss_mask"])
    with logits_at(model, index):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=attention_mask_for(model, batch["attention_mask"]))
    if not ps.is_pipeline_last_stage():
        return out
    # the model's own loss (fp32 vocab-parallel CE; [b, s] labels, [s, b, V] logits) on [1, n]
    loss_fn = get_attr_wrapped_model(model, "compute_language_model_loss")
    per_token = loss_fn(select_counted(batch["labels"], index), out.transpose(0, 1))  # [1, n]
    b, s = batch["loss_mask"].shape
    flat = per_token.new_zeros(s * b).index_put((index,), per_token[0])  # [s*b], sequence-first
    return flat.view(s, b).t()  # [b, s]
