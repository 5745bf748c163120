"""Random Megatron weights that are the same *model* at every TP/PP layout, for inference tests
that must not depend on a checkpoint loader (and run in the megatron-core 0.7 tier too).

Each full (TP=1, PP=1) tensor is drawn from a generator seeded by its global name, then this rank's
shard is cut the way Megatron splits it: column-parallel rows (qkv: whole query groups thanks to
the per-group [q..., k, v] interleave; vocab rows of embedding and output layer), row-parallel
columns (linear_proj, linear_fc2), the gated fc1 as [gate_r; up_r], norms replicated.
"""
from __future__ import annotations

import math
import re
import zlib

import torch


def _full(name: str, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
    if name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if "word_embeddings" in name:
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[1])


def set_layout_independent_weights(model, cfg, seed: int = 0) -> None:
    """Overwrite every parameter of this rank's GPTModel (local spec) with its shard of the
    seeded full model."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    offset = stage * (cfg.num_layers // pp)
    h, vp = cfg.hidden_size, cfg.padded_vocab_size(tp)
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
    full_shapes = {
        "embedding.word_embeddings.weight": (vp, h), "output_layer.weight": (vp, h),
        "decoder.final_layernorm.weight": (h,), "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_proj.weight": (h, cfg.q_size),
        "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size),
    }
    for name, param in model.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        key, global_name = name, name
        if m:
            key = m.group(2)
            global_name = f"decoder.layers.{int(m.group(1)) + offset}.{key}"
        full = _full(global_name, full_shapes[key], seed)
        if key in ("self_attention.linear_qkv.weight", "embedding.word_embeddings.weight",
                   "output_layer.weight"):
            shard = full.chunk(tp, 0)[rank]
        elif key in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
            shard = full.chunk(tp, 1)[rank]
        elif key == "mlp.linear_fc1.weight":
            gate, up = full.chunk(2, 0)
            shard = torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], 0)
        else:
            shard = full
        assert shard.shape == param.shape, (name, shard.shape, param.shape)
        with torch.no_grad():
            param.copy_(shard)


def one_thread_per_rank() -> None:
    """Forked ranks share 2 cores: one intra-op thread each avoids oversubscription (2x faster at
    TP=2; with torch 2.3 even a single forked rank runs tiny matmuls ~20x faster this way)."""
    torch.set_num_threads(1)


def random_runner(cfg, seed: int = 0):
    """A ModelRunner over this rank's part of a seeded random fp32 model."""
    one_thread_per_rank()
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.model.build import build_gpt_model

    model = build_gpt_model(cfg, dtype="float32", use_te=False)
    set_layout_independent_weights(model, cfg, seed)
    return ModelRunner(model, cfg)

