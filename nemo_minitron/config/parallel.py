"""Validation of a Megatron parallel layout (TP x PP x DP) against an architecture.

Called before any expensive work (loading weights, building models, spawning ranks), so a bad
layout fails in a second with a message that names the dimension that does not divide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def validate_parallel(cfg: ModelConfig, tp: int = 1, pp: int = 1,
                      world_size: Optional[int] = None) -> ParallelLayout:
    """Check that ``cfg`` can be split ``tp`` ways by tensor and ``pp`` ways by pipeline.

    Megatron splits attention by whole query groups (each rank keeps heads/TP query heads and
    groups/TP K/V heads), the MLP by ffn columns, and the vocabulary by padded rows; pipeline stages
    get num_layers/PP layers each. Returns the layout with the data-parallel size implied by
    ``world_size`` (default: TP*PP, i.e. DP=1).
    """
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    problems = []
    for name, size in (("num_attention_heads", cfg.num_attention_heads),
                       ("num_query_groups", cfg.num_query_groups),
                       ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if size % tp:
            problems.append(f"{name}={size} is not divisible by tensor_model_parallel_size={tp}")
    if cfg.num_layers % pp:
        problems.append(f"num_layers={cfg.num_layers} is not divisible by "
                        f"pipeline_model_parallel_size={pp}")
    if problems:
        raise ConfigError("; ".join(problems))
    if world_size is None:
        world_size = tp * pp
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not a multiple of TP*PP = {tp}*{pp}")
    return ParallelLayout(tp=tp, pp=pp, dp=world_size // (tp * pp))


def valid_tp_sizes(cfg: ModelConfig, max_tp: int = 8):
    """Powers of two up to ``max_tp`` that divide heads, query groups and ffn."""
    sizes, tp = [], 1
    while tp <= max_tp:
        if not (cfg.num_attention_heads % tp or cfg.num_query_groups % tp
                or cfg.ffn_hidden_size % tp):
            sizes.append(tp)
        tp *= 2
    return sizes
