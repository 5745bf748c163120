"""Write a tiny random HF checkpoint laid out exactly like the released Minitron repos.

    >>> from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    >>> write_tiny_hf_checkpoint("/tmp/tiny_teacher", preset="tiny_llama31", seed=0)

What it writes: ``config.json`` (the released style: ``head_dim``, ``rope_theta`` + llama3
``rope_scaling``, ``torch_dtype``), ``generation_config.json``, two ``model-0000K-of-00002.safetensors``
shards with ``model.safetensors.index.json``, and the real Llama-3 tokenizer files.

The tensors have transformers' ``LlamaForCausalLM`` names, shapes and order (the tests check this
against transformers itself and load the result with it), drawn so the logits are O(1) and every
RMSNorm weight differs from 1: HF's default init (std 0.02, norms 1.0) makes logits near zero and
hides mapping bugs. transformers is not needed to write it (the NeMo 24.05 test tier has none).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Union

import torch

from nemo_minitron.checkpoint.fsutil import atomic_output_dir
from nemo_minitron.checkpoint.hf_io import write_safetensors_shards
from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.hf import expected_hf_shapes, to_hf_dict
from nemo_minitron.config.megatron import torch_dtype
from nemo_minitron.config.presets import get_preset


def random_llama_state_dict(cfg: ModelConfig, seed: int = 0) -> dict:
    """A ``LlamaForCausalLM`` state dict for ``cfg`` (fp32, transformers' names, shapes and order)
    with O(1)-logit random weights; the same seed gives the same weights on every stack."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_hf_shapes(cfg).items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            value = torch.randn(shape, generator=gen)
        else:  # Linear [out, in]: unit-variance outputs for unit-variance inputs
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        state[name] = value
    return state


def _balanced_shard_bytes(state: dict, num_shards: int, element_size: int) -> int:
    """A shard-size cap with which the writer's greedy split yields ``num_shards`` shards: the
    largest of the chunks cut where the running size crosses each multiple of total/num_shards."""
    sizes = [t.numel() for t in state.values()]
    total, chunks, current, cut = sum(sizes), [], 0, 1
    for size in sizes:
        current += size
        if cut < num_shards and sum(chunks) + current >= total * cut / num_shards:
            chunks.append(current)
            current, cut = 0, cut + 1
    chunks.append(current)
    return max(chunks) * element_size


def write_tiny_hf_checkpoint(out_dir: str, preset: Union[str, ModelConfig] = "tiny_llama31", *,
                             seed: int = 0, dtype: Optional[str] = None, num_shards: int = 2,
                             tokenizer: bool = True, overwrite: bool = False) -> str:
    """Write an HF checkpoint directory for ``preset`` (a name or a ModelConfig); return its path.

    ``dtype``: storage dtype (default: the config's, bfloat16 like the real repos).
    """
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if dtype is not None:
        cfg = cfg.replace(dtype=str(torch_dtype(dtype)).replace("torch.", ""))
    state = random_llama_state_dict(cfg, seed)
    store = torch_dtype(cfg.dtype)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(to_hf_dict(cfg), f, indent=2)
            f.write("\n")
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, f,
                      indent=2)
            f.write("\n")
        write_safetensors_shards(((n, t.to(store)) for n, t in state.items()), tmp,
                                 max_shard_bytes=_balanced_shard_bytes(
                                     state, num_shards, torch.empty(0, dtype=store).element_size()))
        if tokenizer:
            from nemo_minitron.tokenizer import write_tokenizer_files

            write_tokenizer_files(tmp)
    return os.path.abspath(out_dir)
