"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

Megatron's local ``DotProductAttention`` materializes the full score matrix ``[b*np, sq, sk]``
(baddbmm into a global buffer, then a softmax over it, then bmm): O(s^2) memory and three passes.
On a GPU without Transformer Engine, torch's SDPA runs flash / memory-efficient kernels instead
(causal, GQA); on the CPU it is torch's math path. :class:`SDPAttention` is a drop-in for the
spec's ``core_attention`` submodule (same constructor and ``forward`` signature on megatron-core
0.7.0 and 0.16.1) and is equal to ``DotProductAttention`` within fp32 rounding
(tests/test_attention.py: forward and backward, TP=1 and TP=2, causal and packed masks).

Backend choice (``model.attention_backend``), resolved by :func:`resolve_attention_backend`:

* ``auto`` (default): ``sdpa`` on a GPU when the Transformer Engine spec is not used, Megatron's
  own ``DotProductAttention`` on the CPU (the reference the tests compare against);
* ``sdpa``: this module wherever the local spec is used (CPU too);
* ``megatron``: Megatron's ``DotProductAttention``.

Masks: ``attention_mask=None`` means causal (the training data passes None when no row is packed,
data/training.py); a multi-token query against a longer key (KV cache) is aligned to the bottom right,
a one-token query attends to everything. A given boolean mask ``[b, 1, sq, sk]`` (True = may NOT
attend, Megatron's convention) is the fallback path; it must leave every query at least one key.
Packed rows pass a :class:`~nemo_minitron.data.packing.SegmentMask` (segment ids ``[b, s]``)
instead: one causal SDPA per sample, no ``[s, s]`` tensor (works on torch 2.3 and 2.13, CPU and
GPU, forward and backward). torch's ``flex_attention`` with a same-segment ``BlockMask`` was
measured unusable here: torch 2.13 raises "FlexAttention does not support backward on CPU", and
torch 2.3 has no flex_attention.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F

from nemo_minitron.errors import ConfigError
from nemo_minitron.data.packing import SegmentMask

ATTENTION_BACKENDS = ("auto", "sdpa", "megatron")


def _sdpa_has_enable_gqa() -> bool:
    """torch >= 2.5 repeats k/v heads inside SDPA; torch 2.3 (NeMo 24.05's stack) lacks it."""
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature (torch 2.3)
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "").split(") ->")[0]


_HAS_ENABLE_GQA = _sdpa_has_enable_gqa()


def check_attention_backend(name: str) -> None:
    """A recipe's ``model.attention_backend`` is one this module knows (checked before any model
    or process group exists)."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend={name!r}: choose one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")


def resolve_attention_backend(name: str, use_te: bool) -> str:
    """``sdpa`` or ``megatron`` for the local spec, ``te`` when the TE spec brings its own."""
    check_attention_backend(name)
    if use_te:
        if name == "sdpa":
            raise ConfigError("model.attention_backend=sdpa replaces the local spec's attention, "
                              "but the Transformer Engine spec is in use (it has its own fused "
                              "attention): use auto, or build without TE")
        return "te"
    if name == "auto":
        return "sdpa" if torch.cuda.is_available() else "megatron"
    return name


def with_core_attention(spec, core_attention):
    """A copy of a GPT layer spec whose self-attention uses ``core_attention``."""
    import dataclasses

    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(
        attn.submodules, core_attention=core_attention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=attn))


def _megatron_module():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class SDPAttention(_megatron_module()):
    """``DotProductAttention``'s interface over torch SDPA. Shapes: query ``[sq, b, np, hn]``,
    key/value ``[sk, b, ng, hn]`` (this TP rank's heads; np a multiple of ng), output
    ``[sq, b, np*hn]``."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ConfigError("attention_backend=sdpa does not support context parallelism")
        if getattr(config, "window_size", None) is not None:
            raise ConfigError("attention_backend=sdpa does not support sliding-window attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ConfigError(f"attention_backend=sdpa does not support softmax_type="
                              f"{config.softmax_type!r}")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type, self.attention_type = attn_mask_type, attention_type
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scores by layer_number and the fp32 softmax
        # multiplies them back (Megatron): the net scale is the plain one, as here
        self.softmax_scale = softmax_scale if softmax_scale is not None \
            else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None \
            else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ConfigError("attention_backend=sdpa takes neither attention_bias nor "
                              "packed_seq_params (packed rows pass a SegmentMask)")
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        extra = {}
        if ng != np_:
            if _HAS_ENABLE_GQA:
                extra["enable_gqa"] = True
            else:  # query head j reads group j // (np/ng), as Megatron's repeat_interleave
                k = k.repeat_interleave(np_ // ng, dim=1)
                v = v.repeat_interleave(np_ // ng, dim=1)
        dropout = self.dropout_p if self.training else 0.0

        def sdpa(q, k, v, mask=None, causal=False):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  is_causal=causal, scale=self.softmax_scale,
                                                  **extra)

        rng = contextlib.nullcontext()
        if dropout > 0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            rng = tensor_parallel.get_cuda_rng_tracker().fork()  # per-TP-rank stream (Megatron)
        with rng:
            if isinstance(attention_mask, SegmentMask):
                out = self._per_segment(q, k, v, attention_mask, sdpa)
            else:
                mask, causal = None, False
                if attention_mask is not None:
                    mask = ~attention_mask  # SDPA's boolean: True = takes part; [b|1, 1, sq, sk]
                elif sq > 1 and sq == sk:
                    causal = True
                elif sq > 1:  # new queries against the KV cache: causal from the bottom right
                    qpos = torch.arange(sk - sq, sk, device=q.device)[:, None]
                    mask = torch.arange(sk, device=q.device)[None, :] <= qpos  # [sq, sk]
                out = sdpa(q, k, v, mask, causal)
        # contiguous: megatron-core 0.7.0's linear_proj backward views its saved input
        return out.permute(2, 0, 1, 3).contiguous().view(sq, b, np_ * hn)  # [sq, b, np*hn]

    @staticmethod
    def _per_segment(q, k, v, segments: SegmentMask, sdpa):
        """Packed rows without an ``[s, s]`` mask: one causal SDPA per sample on its own block
        (q ``[1, np, n, hn]``, k/v ``[1, ng, n, hn]``), so scores are ``[np, n, n]`` per sample
        instead of ``[b, np, s, s]``; exactly the dense mask's result, since a query's softmax
        only ever spans its own sample's earlier keys. A padding position attends to itself
        alone (the dense mask keeps the diagonal): its softmax weight is exactly 1, so its output
        is its own value vector (no dropout there: nothing attends to it and it carries no loss).
        Returns ``[b, np, s, hn]``."""
        b, np_, s, hn = q.shape
        if k.shape[2] != s or segments.shape != (b, s):
            raise ConfigError(f"SegmentMask {segments.shape} needs self-attention over the whole "
                              f"row (q [b={b}, s={s}], k length {k.shape[2]}): no KV cache")
        rows = []
        for i, spans in enumerate(segments.runs()):
            pieces = []
            for start, end, padding in spans:
                if padding:
                    vv = v[i:i + 1, :, start:end]  # [1, ng, n, hn] -> each query head's group
                    pieces.append(vv.repeat_interleave(np_ // vv.shape[1], dim=1))
                else:
                    pieces.append(sdpa(q[i:i + 1, :, start:end], k[i:i + 1, :, start:end],
                                       v[i:i + 1, :, start:end], causal=end - start > 1))
            rows.append(torch.cat(pieces, dim=2))  # [1, np, s, hn]
        return torch.cat(rows, dim=0)


def attention_mask_for(model, mask):
    """What ``model``'s core attentions take for ``mask``: a :class:`SegmentMask` stays one only
    when every core attention of the model is the SDPA one; otherwise (Megatron's or TE's) the
    dense ``[b, 1, s, s]`` fallback. Anything else passes unchanged."""
    if not isinstance(mask, SegmentMask):
        return mask
    cores = [m for n, m in model.named_modules() if n.endswith("core_attention")]
    if all(isinstance(m, SDPAttention) for m in cores):
        return mask
    return mask.dense()
