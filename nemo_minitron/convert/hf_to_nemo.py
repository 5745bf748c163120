"""HF checkpoint directory -> .nemo file (NeMo 24.05 and later).

    nemo-minitron convert hf-to-nemo HF_DIR OUT.nemo [--dtype bf16] [--format torch_dist|legacy]
        [--tp N --pp M] [--tokenizer-type ID_OR_PATH] [--overwrite]

Strict: config.json, tensor names and shapes are checked before anything is written; every HF tensor
is consumed by the mapping (``convert/mapping.py``), every Megatron tensor filled. Memory is bounded:
HF tensors are read one at a time (each through its own mmap, released with it) and written out
chunk by chunk (torch_dist: a few layers, or one embedding, per synchronous
``dist_checkpointing.save`` in a one-rank world in this process, ``dist_ckpt.save_torch_dist``)
or rank file by rank file (legacy: ``torch.save`` of one rank's state dict, see
``legacy.write_legacy``). The .nemo tar is written member by member under a temporary name next
to the output and renamed into place at the end; each chunk's data file is copied into the tar as
Megatron wrote it, then deleted.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator, List, Optional, Tuple

import torch

from nemo_minitron.checkpoint import scratch
from nemo_minitron.checkpoint.fsutil import memory_scratch_dir
from nemo_minitron.checkpoint.hf_io import read_shapes
from nemo_minitron.config.hf import check_hf_shapes, read_hf_config
from nemo_minitron.config.megatron import torch_dtype
from nemo_minitron.config.nemo import DEFAULT_TOKENIZER, dump_yaml, to_nemo_dict
from nemo_minitron.config.parallel import validate_parallel
from nemo_minitron.convert import mapping
from nemo_minitron.convert.nemo_file import CONFIG_NAME, TOKENIZER_DIR, WEIGHTS_DIR, NemoTarWriter
from nemo_minitron.convert.progress import Progress
from nemo_minitron.errors import CheckpointError, ConfigError, MinitronError

FORMATS = ("torch_dist", "legacy")
# HF tokenizer files copied into the .nemo when present (tokenizer.json is required)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def dtype_name(dtype: str) -> str:
    return str(torch_dtype(dtype)).replace("torch.", "")


def _chunks(tensors: Iterator[Tuple[str, torch.Tensor]], layer_bytes: int, budget: int
            ) -> Iterator[List[Tuple[str, torch.Tensor]]]:
    """Group the mapped tensors (megatron_names order) into save chunks: each non-layer tensor
    alone (an embedding is the largest single tensor), whole consecutive layers together while they
    fit in ``budget`` bytes (at least one layer). Only one chunk is alive at a time."""
    chunk: List[Tuple[str, torch.Tensor]] = []
    size, chunk_layer = 0, None
    for name, tensor in tensors:
        _, layer = mapping.stacked_key(name)
        next_layer = layer is not None and layer != chunk_layer
        if chunk and (layer is None or chunk_layer is None
                      or (next_layer and size + layer_bytes > budget)):
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        chunk_layer = layer
    if chunk:
        yield chunk


def _tokenizer_section(hf_dir: str, tokenizer_type: Optional[str], staging: str) -> dict:
    """Copy the HF tokenizer files into ``tokenizer/`` of the .nemo; the config names
    ``tokenizer_type`` or, by default, a non-gated hub repo with the same Llama-3 tokenizer (NeMo 24.05
    loads ``tokenizer.type`` with AutoTokenizer). Once extracted, ``<dir>/tokenizer`` is a valid
    ``tokenizer.type`` too; nemo-minitron's own readers prefer the packed files."""
    section = dict(DEFAULT_TOKENIZER)
    if tokenizer_type:
        section["type"] = tokenizer_type
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, f))]
    if "tokenizer.json" in present:
        os.makedirs(os.path.join(staging, TOKENIZER_DIR))
        for name in present:
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(staging, TOKENIZER_DIR, name))
    elif not tokenizer_type:
        raise CheckpointError(f"{hf_dir}: no tokenizer.json to pack into the .nemo; pass "
                              "--tokenizer-type with a hub id or path")
    return section


def hf_to_nemo(hf_dir: str, out_path: str, *, dtype: str = "bf16", fmt: str = "torch_dist",
               tp: int = 1, pp: int = 1, tokenizer_type: Optional[str] = None,
               overwrite: bool = False, chunk_bytes: int = 512 << 20,
               progress: Optional[bool] = None) -> str:
    """Convert; return the .nemo path. See the module docstring."""
    from nemo_minitron.checkpoint.hf_io import SafetensorsDir as HFReader

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out_path = os.path.abspath(out_path)
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output

    check_disjoint({"OUT.nemo": out_path}, {"HF_DIR": hf_dir})  # never over or inside the input
    check_output(out_path, "OUT.nemo", overwrite=overwrite, kind="file")
    if os.path.exists(out_path) and not overwrite:
        raise MinitronError(f"{out_path} exists; pass --overwrite to replace it")
    cfg = read_hf_config(hf_dir)
    validate_parallel(cfg, tp, pp)
    reader = HFReader(hf_dir)
    check_hf_shapes(cfg, read_shapes(hf_dir, reader.weight_map))
    mapping.check_hf_names(cfg, reader.weight_map)
    out_cfg = cfg.replace(dtype=dtype_name(dtype))
    store = torch_dtype(out_cfg.dtype)
    shapes = mapping.megatron_shapes(cfg, tp)
    total = sum(int(torch.Size(s).numel()) for s in shapes.values()) * store.itemsize
    bar = Progress(f"hf-to-nemo {os.path.basename(out_path)}", len(shapes), total, progress)

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    # named after this process, like the archive's temporary file: what a killed conversion
    # leaves is removed by the next one writing here (checkpoint/scratch.py)
    staging = scratch.make_dir(".staging-", os.path.dirname(out_path),
                               stem=f".{os.path.basename(out_path)}")
    scratch_dir = None
    try:
        with NemoTarWriter(out_path, overwrite=overwrite) as tar:
            nemo_cfg = to_nemo_dict(out_cfg, tp=tp, pp=pp,
                                    tokenizer=_tokenizer_section(hf_dir, tokenizer_type, staging),
                                    dist_ckpt_format="torch_dist")
            with open(os.path.join(staging, CONFIG_NAME), "w") as f:
                f.write(dump_yaml(nemo_cfg))
            tar.add_tree(staging)  # config and tokenizer files; the weights follow as written

            def mapped(names=None, count=True):
                for name, full in mapping.hf_to_megatron(cfg, reader, tp=tp, names=names):
                    t = full.to(store)
                    if tuple(t.shape) != shapes[name]:
                        raise CheckpointError(f"{name}: mapped shape {list(t.shape)} != expected "
                                              f"{list(shapes[name])}")
                    if count:
                        bar.update(t.numel() * t.element_size())
                    yield name, t

            weights = os.path.join(staging, WEIGHTS_DIR)
            if fmt == "torch_dist":
                from nemo_minitron.convert.dist_ckpt import save_torch_dist

                layer_bytes = sum(int(torch.Size(s).numel()) for n, s in shapes.items()
                                  if mapping.stacked_key(n)[1] == 0) * store.itemsize
                # the largest data file: a chunk of layers or one non-layer tensor (embedding)
                largest = max([chunk_bytes, layer_bytes] + [
                    int(torch.Size(s).numel()) * store.itemsize for n, s in shapes.items()
                    if mapping.stacked_key(n)[1] is None])
                tar.add_dir(f"./{WEIGHTS_DIR}")
                # Megatron saves each chunk into a scratch dir (in memory where /dev/shm has room:
                # Megatron fsyncs every file it writes); its data file is then copied into the tar
                scratch_dir = scratch.make_dir(".nemo-minitron-scratch-",
                                               memory_scratch_dir(largest + (64 << 20), staging))
                save_torch_dist(out_cfg, _chunks(mapped(), layer_bytes, chunk_bytes), weights,
                                scratch=scratch_dir, on_data_file=lambda path, name: tar.add_file(
                                    path, f"./{WEIGHTS_DIR}/{name}"))
                tar.add_tree(weights, f"./{WEIGHTS_DIR}")  # common.pt, .metadata, metadata.json
            else:
                from nemo_minitron.convert.legacy import write_legacy

                def legacy_into_tar(path, rel):  # each rank's file, as soon as it is written
                    if os.path.dirname(rel):
                        tar.add_dir(f"./{os.path.dirname(rel)}")
                    tar.add_file(path, f"./{rel}")
                    os.unlink(path)

                by_name = {n: (n, r, l) for n, r, l in mapping.megatron_names(cfg)}
                legacy_root = os.path.join(staging, ".legacy")
                # at TP>1 a full tensor is made once per rank file: progress counts the shards
                write_legacy(cfg, lambda n: next(mapped([by_name[n]], count=False))[1],
                             legacy_root, tp, pp, store, on_file=legacy_into_tar,
                             on_tensor=lambda nbytes, tensors: bar.update(nbytes, tensors))
            bar.close()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if scratch_dir is not None:  # in /dev/shm unless inside staging
            shutil.rmtree(scratch_dir, ignore_errors=True)
    return out_path
