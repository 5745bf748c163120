"""The final output of a training run: the trained model as an HF checkpoint directory.

Every rank holds a TP shard of one pipeline stage. :func:`gather_megatron_state` all-gathers the TP
shards inside each stage (``mapping.tp_unshard``: qkv by query groups, fc1 as ``[gate_r; up_r]`` per
rank, proj/fc2 by columns) and collects the stages on global rank 0 under full-model names (global
layer indices); rank 0 then maps them to HF names (``mapping.megatron_to_hf``, vocab padding sliced
off) and writes shards, config.json and the base model's tokenizer files into a temporary directory
that is renamed into place when complete.

Rank 0 holds the whole model once (fp32 for a fp32 run): fine for 4B/8B on a training node, and the
simplest thing that is correct; a streaming writer can replace it without changing the interface.
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, Optional

import torch
import torch.distributed as dist

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.convert import mapping
from nemo_minitron.errors import MinitronError

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json")


def gather_megatron_state(model, cfg: ModelConfig) -> Optional[Dict[str, torch.Tensor]]:
    """Collective. Full Megatron tensors (checkpoint names, global layers) on rank 0, else None."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    offset = mapping.layer_offset(cfg, ps.get_pipeline_model_parallel_rank(), pp)
    stage: Dict[str, torch.Tensor] = {}
    for name, param in sorted(mapping.model_params(model).items()):
        local = param.detach().cpu()
        if tp > 1 and mapping.rule_for(name).tp_dim is not None:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
            local = mapping.tp_unshard(name, shards)
        stage[mapping.to_local_layer(name, -offset)] = local
    return collect_on_rank0(stage)


def collect_on_rank0(stage: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    """Collective. Each pipeline stage's dict (already TP-gathered; DP/TP replicas send nothing)
    merged on global rank 0; None elsewhere."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0 or ps.get_tensor_model_parallel_rank() != 0:
        stage = None  # replicas: one copy per stage is enough
    if dist.get_world_size() == 1:
        return stage
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(stage, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    full: Dict[str, torch.Tensor] = {}
    for part in gathered:
        full.update(part or {})
    return full


def write_hf_checkpoint(full: Dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str,
                        base_dir: Optional[str] = None, overwrite: bool = False,
                        dtype: Optional[str] = None) -> str:
    """(rank 0) Write ``full`` Megatron tensors as an HF checkpoint directory like the base one."""
    from nemo_minitron.checkpoint.fsutil import atomic_output_dir
    from nemo_minitron.checkpoint.hf_io import write_safetensors_shards
    from nemo_minitron.config.hf import write_hf_config
    from nemo_minitron.config.megatron import torch_dtype

    names = {n for n, _, _ in mapping.megatron_names(cfg)}
    if set(full) != names:
        raise MinitronError(f"gathered model does not match the mapping: missing "
                            f"{sorted(names - set(full))[:4]}, unexpected "
                            f"{sorted(set(full) - names)[:4]}")
    store = torch_dtype(dtype or cfg.dtype)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors_shards(((n, t.to(store)) for n, t in
                                  mapping.megatron_to_hf(cfg, full.__getitem__)), tmp)
        write_hf_config(cfg, tmp)
        for name in COPIED_FILES if base_dir else ():
            src = os.path.join(base_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
    return os.path.abspath(out_dir)


def save_final_output(model, cfg: ModelConfig, out: str, base_dir: Optional[str] = None,
                      overwrite: bool = False) -> Optional[str]:
    """Collective. Write the trained model to ``out``; returns the path on rank 0."""
    check_output_path(out)
    full = gather_megatron_state(model, cfg)
    path = write_output(full, cfg, out, base_dir, overwrite) if full is not None else None
    if dist.is_initialized():
        dist.barrier()
    return path


def write_output(full: Dict[str, torch.Tensor], cfg: ModelConfig, out: str,
                 base_dir: Optional[str] = None, overwrite: bool = False) -> str:
    """(one process) Full Megatron tensors -> ``out``: an HF directory, or a ``.nemo`` converted
    from a temporary HF directory next to it."""
    if not out.endswith(".nemo"):
        return write_hf_checkpoint(full, cfg, out, base_dir=base_dir, overwrite=overwrite)
    from nemo_minitron.checkpoint import scratch
    from nemo_minitron.convert.io import hf_dir_to_nemo

    if os.path.exists(out) and not overwrite:
        raise MinitronError(f"{out} exists; pass --overwrite to replace it")
    # named after this process: a later run removes it if this one is killed (scratch.sweep)
    tmp = scratch.make_dir(".hf-", os.path.dirname(os.path.abspath(out)),
                           stem="." + os.path.basename(out))
    try:
        hf_dir = write_hf_checkpoint(full, cfg, os.path.join(tmp, "hf"), base_dir=base_dir)
        return hf_dir_to_nemo(hf_dir, out, dtype={"bfloat16": "bf16", "float16": "fp16",
                                                  "float32": "fp32"}[cfg.dtype],
                              overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(out: str) -> None:
    """Called before training, so a bad output path fails first, not after hours."""
    if not out:
        raise MinitronError("no output path given (--out)")
