"""Load an HF checkpoint directory straight into a built Megatron GPTModel, on any TP/PP rank.

Each rank reads only the HF tensors its own stage needs (safetensors reads lazily), maps them
through ``nemo_minitron.convert.mapping`` (the same table the converter uses), takes its TP shard
and copies it into the parameter. Strict: the checkpoint's tensor names and shapes are checked
against config.json first; every parameter of the model must be filled.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from nemo_minitron.checkpoint.hf_io import read_shapes, read_weight_map
from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.hf import check_hf_shapes
from nemo_minitron.convert import mapping
from nemo_minitron.errors import CheckpointError


class HFReader:
    """Lazy tensor access to an HF safetensors directory (one open handle per shard)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        self.weight_map = read_weight_map(hf_dir)
        self._handles = {s: safe_open(os.path.join(hf_dir, s), framework="pt")
                         for s in sorted(set(self.weight_map.values()))}

    def __call__(self, name: str) -> torch.Tensor:
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.hf_dir}: tensor {name} is missing") from None
        return self._handles[shard].get_tensor(name)


def load_hf_into_model(model, cfg: ModelConfig, hf_dir: str, reader: Optional[HFReader] = None):
    """Fill ``model`` (this rank's part, at the TP/PP of Megatron's parallel state) from ``hf_dir``."""
    from megatron.core import parallel_state as ps

    reader = reader or HFReader(hf_dir)
    check_hf_shapes(cfg, read_shapes(hf_dir, reader.weight_map))
    mapping.check_hf_names(cfg, reader.weight_map)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    offset = mapping.layer_offset(cfg, pp_rank, pp)
    names = mapping.stage_names(cfg, pp_rank, pp)
    params = mapping.model_params(model)
    expected = {mapping.to_local_layer(n, offset) for n, _, _ in names}
    mapping.check_model_names(model, expected)
    with torch.no_grad():
        for name, full in mapping.hf_to_megatron(cfg, reader, tp=tp, names=names):
            local = mapping.to_local_layer(name, offset)
            shard = mapping.tp_shard(name, full, tp_rank, tp)
            param = params[local]
            if tuple(shard.shape) != tuple(param.shape):
                raise CheckpointError(f"{name}: mapped shard {list(shard.shape)} does not fit the "
                                      f"model parameter {list(param.shape)} (TP={tp})")
            param.copy_(shard.to(param.dtype))
    return model
