""".nemo (tar, tar.gz or extracted directory; torch_dist, zarr or legacy weights) -> HF directory.

    nemo-minitron convert nemo-to-hf IN.nemo OUT_DIR [--dtype bf16|fp16|fp32] [--overwrite]

Writes sharded safetensors (<= 5 GB shards) with ``model.safetensors.index.json``, ``config.json``
(explicit head_dim, rope_theta + llama3 rope_scaling, torch_dtype), ``generation_config.json`` and the
tokenizer files; transformers loads the directory as is. The padded vocabulary (any padding) is
sliced back to the tokenizer's. One tensor (one layer for distributed checkpoints) is in memory at
a time; the output is built under a temporary name and renamed into place. A .nemo tar is not
extracted for torch_dist weights: each stored chunk is ``torch.load``ed from its byte range in the
tar.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Tuple

import torch

from nemo_minitron.checkpoint.fsutil import atomic_output_dir
from nemo_minitron.checkpoint.hf_io import write_safetensors_streaming
from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.hf import expected_hf_shapes, write_hf_config
from nemo_minitron.config.megatron import torch_dtype
from nemo_minitron.config.nemo import load_yaml, read_nemo_config
from nemo_minitron.convert import mapping
from nemo_minitron.convert.nemo_file import CONFIG_NAME, TOKENIZER_DIR, detect_layout, opened_nemo
from nemo_minitron.convert.progress import Progress
from nemo_minitron.errors import CheckpointError

FAMILY_VOCAB = 128256  # Llama-3 tokenizer: the vocabulary when a NeMo config names none


def tokenizer_dir(root: str) -> Optional[str]:
    """The packed HF tokenizer of an extracted .nemo, or a local directory tokenizer.type names."""
    packed = os.path.join(root, TOKENIZER_DIR)
    if os.path.isfile(os.path.join(packed, "tokenizer.json")):
        return packed
    section = load_yaml(os.path.join(root, CONFIG_NAME)).get("tokenizer") or {}
    path = section.get("type") if isinstance(section, dict) else None
    if isinstance(path, str) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    return None


def copy_tokenizer_files(tok: Optional[str], out_dir: str) -> None:
    """A .nemo's HF tokenizer files (``tok``: :func:`tokenizer_dir`) into an HF directory; where it
    has none (a NeMo-written .nemo), the family's Llama-3.1 tokenizer."""
    if tok is None:
        from nemo_minitron.tokenizer import write_tokenizer_files

        write_tokenizer_files(out_dir)
        return
    for name in os.listdir(tok):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                    "generation_config.json"):
            shutil.copyfile(os.path.join(tok, name), os.path.join(out_dir, name))


def _tokenizer_vocab(tok_dir: Optional[str]) -> Optional[int]:
    if tok_dir is None:
        return None
    with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    ids = list(data.get("model", {}).get("vocab", {}).values())
    ids += [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def read_config(root: str, label: str) -> ModelConfig:
    """The architecture of an extracted .nemo; the vocabulary from the yaml, else the packed
    tokenizer, else the family's 128256."""
    raw = load_yaml(os.path.join(root, CONFIG_NAME))
    vocab = None if raw.get("vocab_size") is not None else (
        _tokenizer_vocab(tokenizer_dir(root)) or FAMILY_VOCAB)
    return read_nemo_config(os.path.join(root, CONFIG_NAME), label=label, vocab_size=vocab)


def weights_reader(root: str, cfg: ModelConfig, in_place=None):
    """(layout, reader) for an extracted .nemo; ``reader.get(name)`` gives the full tensor.
    ``in_place``: torch_dist data files left in the .nemo tar (see ``opened_nemo``)."""
    from nemo_minitron.convert import dist_ckpt, legacy

    layout, tp, pp = detect_layout(root)
    weights = os.path.join(root, "model_weights")
    if layout == "torch_dist":
        return layout, dist_ckpt.TorchDistReader(weights, in_place)
    if layout == "zarr":
        return layout, dist_ckpt.ZarrReader(weights)
    return (f"legacy TP={tp} PP={pp}" if (tp, pp) != (1, 1) else "legacy"), \
        legacy.LegacyReader(root, cfg, tp, pp)


def _check_stored_shape(cfg: ModelConfig, want, name: str, shape: tuple) -> None:
    if name in mapping.VOCAB_NAMES:
        ok = len(shape) == 2 and shape[1] == want[name][1] and shape[0] >= cfg.vocab_size
    else:
        ok = shape == want[name]
    if not ok:
        raise CheckpointError(f"{name}: stored shape {list(shape)} does not match the config "
                              f"(expected {list(want[name])}"
                              + (", rows >= vocab" if name in mapping.VOCAB_NAMES else "") + ")")


def checked_getter(cfg: ModelConfig, reader):
    """reader.get with each tensor's shape checked against the config (vocab rows: >= vocab)."""
    want = mapping.megatron_shapes(cfg)

    def get(name: str) -> torch.Tensor:
        t = reader.get(name)
        _check_stored_shape(cfg, want, name, tuple(t.shape))
        return t

    return get


def check_stored_keys(cfg: ModelConfig, reader) -> None:
    """Distributed checkpoints: stored keys equal the mapping's (none missing, none unmapped)."""
    if not hasattr(reader, "shapes"):
        return
    want = {mapping.stacked_key(n)[0] for n in mapping.megatron_shapes(cfg)}
    have = set(reader.shapes())
    if want != have:
        raise CheckpointError(f"{reader.where}: stored tensors do not match the Llama-3.1 mapping: "
                              f"missing {sorted(want - have)[:4]}, not mapped {sorted(have - want)[:4]}")
    for key, (shape, _) in reader.shapes().items():
        if key.startswith("decoder.layers.") and shape[0] != cfg.num_layers:
            raise CheckpointError(f"{reader.where}: {key} stacks {shape[0]} layers, config has "
                                  f"{cfg.num_layers}")


def nemo_to_hf(nemo_path: str, out_dir: str, *, dtype: Optional[str] = None,
               overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
               progress: Optional[bool] = None) -> Tuple[str, str]:
    """Convert; return (output directory, source weight layout). ``dtype``: default the stored one."""
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output

    check_disjoint({"OUT_DIR": out_dir}, {"IN.nemo": nemo_path})  # never over or inside the input
    check_output(out_dir, "OUT_DIR", overwrite=overwrite, kind="dir")
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{os.path.abspath(out_dir)} exists; pass --overwrite to replace it")
    in_place = {}  # torch_dist data files are read from the tar where they lie, not extracted
    with opened_nemo(nemo_path, in_place) as root:
        cfg = read_config(root, nemo_path)
        layout, reader = weights_reader(root, cfg, in_place)
        check_stored_keys(cfg, reader)
        get = checked_getter(cfg, reader)
        if dtype is None:  # the stored one (distributed checkpoints: from the metadata)
            stored = reader.shapes()["decoder.final_layernorm.weight"][1] \
                if hasattr(reader, "shapes") else get("decoder.final_layernorm.weight").dtype
            dtype = str(stored).replace("torch.", "")
        out_cfg = cfg.replace(dtype=str(torch_dtype(dtype)).replace("torch.", ""))
        store = torch_dtype(out_cfg.dtype)
        shapes = expected_hf_shapes(cfg)
        specs = [(n, s, store) for n, s in shapes.items()]
        total = sum(int(torch.Size(s).numel()) for s in shapes.values()) * store.itemsize
        bar = Progress(f"nemo-to-hf {os.path.basename(out_dir)}", len(specs), total, progress)
        tok = tokenizer_dir(root)
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            tensors = ((n, t.to(store)) for n, t in mapping.megatron_to_hf(cfg, get))
            write_safetensors_streaming(specs, tensors, tmp, max_shard_bytes=max_shard_bytes,
                                        on_tensor=bar.update)
            if hasattr(reader, "check_all_used"):
                reader.check_all_used()
            write_hf_config(out_cfg, tmp)
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id
                           if isinstance(cfg.eos_token_id, int) else list(cfg.eos_token_id)},
                          f, indent=2)
                f.write("\n")
            copy_tokenizer_files(tok, tmp)
        bar.close()
    return os.path.abspath(out_dir), layout
