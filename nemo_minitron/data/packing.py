"""Packed rows' attention pattern as segment ids, without an ``[s, s]`` tensor.

A packed row holds several samples back to back, then padding (data/training.py ``make_row``):
``segment_ids [b, s]`` is the sample's index within its row per position, -1 on padding. Attention
is causal and stays inside a sample; a padding position attends to itself only.

:class:`SegmentMask` travels in ``attention_mask``'s place through Megatron's ``GPTModel`` ->
``TransformerBlock`` -> ``TransformerLayer`` -> ``SelfAttention`` (megatron-core 0.7.0 and 0.16.1
only pass ``attention_mask`` on to the core attention; 0.16.1 reads it itself only under CUDA
graphs, which this project does not use). The SDPA core attention (model/attention.py) runs one
causal attention per sample on the sample's own ``[n, n]`` block; every other core attention
(Megatron's ``DotProductAttention``, TE) gets the dense boolean mask ``[b, 1, s, s]`` instead,
through ``nemo_minitron.model.attention.attention_mask_for`` at the model call -- the fallback.

Megatron-free on purpose: the data (data/training.py) builds these without importing megatron.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from nemo_minitron.errors import ConfigError


def dense_segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> Megatron's boolean mask [b, 1, s, s], True = may NOT attend:
    causal, and only within the same segment (padding positions attend to themselves only)."""
    b, s = segment_ids.shape
    dev = segment_ids.device
    causal = torch.ones(s, s, dtype=torch.bool, device=dev).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    pad = segment_ids < 0
    same = same & ~(pad[:, :, None] | pad[:, None, :]) | torch.eye(s, dtype=torch.bool, device=dev)
    return ~(causal & same)[:, None]


class SegmentMask:
    """``segment_ids [b, s]`` standing in for the dense ``[b, 1, s, s]`` mask; ``runs()`` gives,
    per row, the contiguous ``(start, end, is_padding)`` spans the SDPA path attends within."""

    def __init__(self, segment_ids: torch.Tensor):
        if segment_ids.dim() != 2 or segment_ids.dtype != torch.long:
            raise ConfigError(f"SegmentMask needs long segment ids [b, s], got "
                              f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
        self.segment_ids = segment_ids
        self._runs = None

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.segment_ids.shape)

    def to(self, device) -> "SegmentMask":
        out = SegmentMask(self.segment_ids.to(device))
        out._runs = self.runs()  # plain ints, found here on the CPU: no device sync per layer
        return out

    def dense(self) -> torch.Tensor:
        """The fallback: Megatron's boolean mask [b, 1, s, s] (True = may NOT attend)."""
        return dense_segment_mask(self.segment_ids)

    def runs(self) -> List[List[Tuple[int, int, bool]]]:
        """Per row, spans of equal ids in order; each sample must be one span (make_row's rows
        are), else a per-span attention would differ from the dense mask: a loud error."""
        if self._runs is None:
            rows = []
            for ids in self.segment_ids.cpu().tolist():
                spans, seen, start = [], set(), 0
                for j in range(1, len(ids) + 1):
                    if j == len(ids) or ids[j] != ids[start]:
                        if ids[start] >= 0:
                            if ids[start] in seen:
                                raise ConfigError(f"packed row: segment {ids[start]} is not "
                                                  f"contiguous (positions {start}..{j - 1})")
                            seen.add(ids[start])
                        spans.append((start, j, ids[start] < 0))
                        start = j
                rows.append(spans)
            self._runs = rows
        return self._runs
