"""NeMo's distributed-checkpoint weights (``model_weights/``): written through Megatron-Core's
``dist_checkpointing.save`` (torch_dist), read back as torch_dist or as NeMo 24.05's zarr.

Layout (shared/FACTS.md section 3): keys carry the prefix ``model.``; per-layer tensors are stacked,
``model.decoder.layers.mlp.linear_fc1.weight [num_layers, 2*ffn, hidden]``, each layer one chunk at
offset ``(layer, 0, 0)`` (what a TP=1/PP=1 GPTModel's sharded state dict holds); embedding and output
layer are ``[padded_vocab, hidden]``; ``_extra_state`` objects per layer for linear_qkv/proj/fc1/fc2.

Chunked write (memory: one chunk of tensors, not the model): one synchronous
``dist_checkpointing.save`` per chunk of tensors (the embedding, a run of consecutive layers, the
output layer), each into its own scratch directory, in a one-rank gloo world set up in this
process (``dist.one_rank_world``). Each chunk's one ``.distcp`` data file is handed on as Megatron
wrote it (copied into the .nemo tar, or moved into ``model_weights/``) and the chunks' DCP
``.metadata`` are merged into one. A chunk holding layers [a, b) saves each stacked key as a
``[b - a, ...]`` tensor (Megatron's torch_dist strategy insists that a rank's shards form a
complete regular grid, so in a 1-rank world a chunk cannot declare the full ``[num_layers, ...]``
shape); the merge shifts those chunks' offsets by ``a`` and sets the global size to
``num_layers``. DCP stores every shard as its own item, addressed only through this metadata, so
the shift is the whole change. The tests load the result with Megatron's own
``dist_checkpointing.load`` (current stack and megatron-core 0.7.0 / torch 2.3).

torch 2.3 compatibility: the merged ``Metadata`` is pickled without its ``storage_meta`` attribute,
whose class (``StorageMeta``) torch 2.3 lacks (``AttributeError: Can't get attribute 'StorageMeta'``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nemo_minitron.checkpoint.hf_io import OpenFiles
from nemo_minitron.checkpoint.untrusted import check_common, load_weights_only, read_dcp_metadata
from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.convert import mapping
from nemo_minitron.errors import CheckpointError

PREFIX = "model."
KNOWN_PREFIXES = ("model.module.", "model.")  # NeMo writes model.module. under megatron_amp_O2
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}


# ---- writing ------------------------------------------------------------------------------------
def _sharded_chunk(cfg: ModelConfig, tensors: Sequence[Tuple[str, torch.Tensor]]) -> dict:
    """Megatron ShardedTensors/Objects for full tensors named by layer-indexed checkpoint names."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    out, layers = {}, []
    for name, tensor in tensors:
        key, layer = mapping.stacked_key(name)
        if layer is None:
            out[name] = ShardedTensor.from_rank_offsets(PREFIX + key, tensor, replica_id=0)
        else:  # one [1, *shape] chunk of the stacked [num_layers, *shape] tensor
            layers.append(layer)
    base = min(layers) if layers else 0
    if layers and sorted(set(layers)) != list(range(base, max(layers) + 1)):
        raise CheckpointError(f"a chunk must hold consecutive layers, got {sorted(set(layers))}")
    span = max(layers) + 1 - base if layers else 0
    for name, tensor in tensors:
        key, layer = mapping.stacked_key(name)
        if layer is not None:  # one [1, *shape] chunk of the chunk-local stacked [span, *shape]
            out[name] = ShardedTensor.from_rank_offsets(
                PREFIX + key, tensor, (0, layer - base, span), replica_id=0, prepend_axis_num=1)
    layers = sorted(set(layers))
    for layer in layers:
        for module in mapping.EXTRA_STATE_MODULES:
            key = f"{PREFIX}decoder.layers.{module}._extra_state"
            out[f"{key}.{layer}"] = ShardedObject(key, None, (cfg.num_layers,), (layer,),
                                                  replica_id=0)
    return out, base


def _is_stacked(fqn: str) -> bool:
    return fqn.startswith(PREFIX + "decoder.layers.") and "/shard_" not in fqn


def _shift(md, base: int, num_layers: int) -> None:
    """Chunk-local stacked keys -> their place in the [num_layers, ...] global tensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, smd in md.state_dict_metadata.items():
        if isinstance(smd, TensorStorageMetadata) and _is_stacked(key):
            smd.size = torch.Size((num_layers,) + tuple(smd.size[1:]))
            smd.chunks = [dataclasses.replace(c, offsets=torch.Size(
                (c.offsets[0] + base,) + tuple(c.offsets[1:]))) for c in smd.chunks]
    md.storage_data = {
        (dataclasses.replace(i, offset=torch.Size((i.offset[0] + base,) + tuple(i.offset[1:])))
         if _is_stacked(i.fqn) and i.offset is not None else i): info
        for i, info in md.storage_data.items()}


def _merge_metadata(parts: List[Tuple[object, Dict[str, str]]]):
    """One DCP Metadata from the chunks' (shifted metadata, {old file name: new file name})."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    merged = Metadata(state_dict_metadata={}, planner_data={}, storage_data={})
    mcore_data = {}
    for md, renames in parts:
        for key, smd in md.state_dict_metadata.items():
            have = merged.state_dict_metadata.get(key)
            if have is None:
                merged.state_dict_metadata[key] = smd
            elif isinstance(smd, TensorStorageMetadata) and isinstance(have, TensorStorageMetadata) \
                    and have.size == smd.size and have.properties.dtype == smd.properties.dtype:
                have.chunks.extend(smd.chunks)  # more layers of a stacked key
            else:
                raise CheckpointError(f"{key}: written twice with different metadata")
        for index, info in md.storage_data.items():
            merged.storage_data[index] = dataclasses.replace(
                info, relative_path=renames[info.relative_path])
        if isinstance(md.planner_data, dict):
            merged.planner_data.update(md.planner_data)
        mcore_data.update(getattr(md, "mcore_data", None) or {})
        if getattr(md, "version", None) is not None:
            merged.version = md.version
    if mcore_data:
        merged.mcore_data = mcore_data
    return torch23_metadata(merged)


def torch23_metadata(md):
    """``md`` (a DCP Metadata) as torch 2.3 can unpickle it: torch 2.3 lacks ``StorageMeta``, so
    the ``storage_meta`` attribute is left out of the pickle entirely."""
    md.__dict__.pop("storage_meta", None)
    return md


def make_torch23_readable(weights_dir: str) -> None:
    """Rewrite the ``.metadata`` of a checkpoint that ``dist_checkpointing.save`` wrote on this
    torch (e.g. a job's .nemo output) so NeMo 24.05's torch 2.3 loads it (:func:`torch23_metadata`);
    atomic (written beside it, then renamed). Where Megatron (0.19) wrote no ``common.pt``, it is
    written from the ``common_state`` object, which leaves the metadata (:func:`_legacy_common`)."""
    md = read_dcp_metadata(weights_dir, torch_classes=True)
    common = _legacy_common(weights_dir, md)
    if common is not None:
        torch.save(common, os.path.join(weights_dir, "common.pt.tmp"))
        os.replace(os.path.join(weights_dir, "common.pt.tmp"),
                   os.path.join(weights_dir, "common.pt"))
    md = torch23_metadata(md)
    path = os.path.join(weights_dir, ".metadata")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(md, f)
    os.replace(path + ".tmp", path)


def sharded_full_model(cfg: ModelConfig, tensors: Sequence[Tuple[str, torch.Tensor]]) -> dict:
    """The sharded state dict (``model.`` keys, stacked layers, ``_extra_state`` objects) of a
    whole model given as full tensors under layer-indexed checkpoint names, held by one rank: what
    a TP=1/PP=1 GPTModel's ``sharded_state_dict(prefix="model.")`` holds."""
    names = [n for n, _ in tensors]
    want = set(mapping.megatron_shapes(cfg))
    if set(names) != want or len(names) != len(want):
        raise CheckpointError(f"not a whole model: missing {sorted(want - set(names))[:4]}, "
                              f"unexpected {sorted(set(names) - want)[:4]}")
    return _sharded_chunk(cfg, tensors)[0]


def save_torch_dist(cfg: ModelConfig, chunks: Iterable[Sequence[Tuple[str, torch.Tensor]]],
                    out_dir: str, *, scratch: Optional[str] = None,
                    on_data_file: Optional[Callable[[str, str], None]] = None) -> None:
    """Write ``model_weights/`` (``out_dir``, created here) from chunks of (layer-indexed
    checkpoint name, full tensor): each chunk saved by a synchronous ``dist_checkpointing.save``
    into its own scratch directory under ``scratch`` (default ``out_dir``; a tmpfs such as
    /dev/shm keeps these files off the disk, and Megatron fsyncs every file it writes), in a
    one-rank world (``dist.one_rank_world``: an error inside a multi-rank process group).

    Each chunk's data file is handed to ``on_data_file(path, name)`` (e.g. added to the .nemo tar
    as ``model_weights/<name>``; the file is deleted afterwards) or, without it, moved into
    ``out_dir`` as ``name`` (``__<chunk>_0.distcp``). ``common.pt``, ``.metadata`` and
    ``metadata.json`` always end up in ``out_dir``."""
    from nemo_minitron.dist import one_rank_world

    os.makedirs(out_dir)
    with one_rank_world():
        _save_chunks(cfg, chunks, out_dir, scratch or out_dir, on_data_file)


def _save_chunks(cfg: ModelConfig, chunks, out_dir: str, scratch_root: str, on_data_file) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from nemo_minitron.checkpoint import scratch

    parts, written = [], set()
    for k, chunk in enumerate(chunks):
        names = [n for n, _ in chunk]
        dup = written.intersection(names)
        if dup:
            raise CheckpointError(f"tensor(s) written twice: {', '.join(sorted(dup))}")
        written.update(names)
        chunk_dir = scratch.make_dir(".chunk-", scratch_root, stem=f".{k:05d}")
        try:
            sharded, base = _sharded_chunk(cfg, chunk)
            del chunk
            # thread_count=1: one data file per chunk. validate_access_integrity=False: the
            # extra-state objects name their global layer (shard_<layer>_<num_layers>), so a
            # chunk holds only some of them
            dist_checkpointing.save(sharded, chunk_dir, validate_access_integrity=False,
                                    sharded_strategy=TorchDistSaveShardedStrategy(
                                        "torch_dist", 1, thread_count=1))
            del sharded
            md = read_dcp_metadata(chunk_dir, torch_classes=True)
            common = _legacy_common(chunk_dir, md)
            _shift(md, base, cfg.num_layers)
            files = sorted({info.relative_path for info in md.storage_data.values()})
            if len(files) != 1:
                raise CheckpointError(f"chunk {k}: Megatron wrote {len(files)} data files "
                                      f"({files[:3]}), expected one")
            name = f"__{k}_0.distcp"
            if on_data_file is not None:
                on_data_file(os.path.join(chunk_dir, files[0]), name)
            else:
                shutil.move(os.path.join(chunk_dir, files[0]), os.path.join(out_dir, name))
            parts.append((md, {files[0]: name}))
            if k == 0:
                if common is None:
                    shutil.move(os.path.join(chunk_dir, "common.pt"),
                                os.path.join(out_dir, "common.pt"))
                else:
                    torch.save(common, os.path.join(out_dir, "common.pt"))
        finally:
            shutil.rmtree(chunk_dir, ignore_errors=True)
    merged = _merge_metadata(parts)
    _check_coverage(cfg, merged, written)
    with open(os.path.join(out_dir, ".metadata"), "wb") as f:
        pickle.dump(merged, f)
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(METADATA_JSON, f)


def _legacy_common(weights_dir: str, md):
    """None where Megatron wrote ``common.pt`` (megatron-core <= 0.16). Newer Megatron (0.19)
    stores the common (non-sharded) state as a ``common_state`` ShardedObject inside the data
    file instead; then that object is read back (Megatron's ``load_common_state_dict``), dropped
    from ``md`` (every chunk has one; the merged checkpoint would hold it several times) and
    returned, to be written as ``common.pt``: the layout megatron-core 0.7 / 0.16 read, and that
    0.19 still reads (its legacy branch)."""
    if os.path.exists(os.path.join(weights_dir, "common.pt")):
        return None
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    key = ShardedObject("common_state", None, (1,), (0,)).unique_key
    if key not in md.state_dict_metadata:
        raise CheckpointError(f"{weights_dir}: Megatron wrote neither common.pt nor {key}")
    common = load_common_state_dict(weights_dir)
    del md.state_dict_metadata[key]
    md.storage_data = {i: info for i, info in md.storage_data.items() if i.fqn != key}
    if isinstance(md.planner_data, dict):
        md.planner_data.pop(key, None)
    return common


def _check_coverage(cfg: ModelConfig, md, written) -> None:
    """Every stacked key has all its layers, every expected tensor was written."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    want = set(mapping.megatron_shapes(cfg))
    if want != set(written):
        raise CheckpointError(f"distributed checkpoint incomplete: missing "
                              f"{sorted(want - set(written))[:4]}, extra {sorted(set(written) - want)[:4]}")
    for key, smd in md.state_dict_metadata.items():
        if isinstance(smd, TensorStorageMetadata):
            covered = sum(int(np.prod(c.sizes)) for c in smd.chunks)
            if covered != int(np.prod(smd.size)):
                raise CheckpointError(f"{key}: chunks cover {covered} of {int(np.prod(smd.size))} "
                                      "elements")


# ---- reading ------------------------------------------------------------------------------------
def read_backend(weights_dir: str) -> str:
    path = os.path.join(weights_dir, "metadata.json")
    try:
        with open(path) as f:
            backend = json.load(f)["sharded_backend"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a distributed-checkpoint metadata.json ({e})") from None
    if backend not in ("torch_dist", "zarr"):
        raise CheckpointError(f"{path}: sharded_backend {backend!r} is not supported "
                              "(torch_dist or zarr)")
    return backend


def _strip_prefix(keys: Iterable[str], where: str) -> Tuple[str, Dict[str, str]]:
    """(prefix, {key without prefix: stored key}) for keys stored under model. / model.module."""
    keys = list(keys)
    for prefix in KNOWN_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix, {k[len(prefix):]: k for k in keys}
    raise CheckpointError(f"{where}: tensor keys do not all start with 'model.' or 'model.module.' "
                          f"(e.g. {sorted(keys)[:2]})")


class _LayerCachedReader:
    """``get(name)`` for layer-indexed names; loads a whole layer at once and keeps one layer."""

    def __init__(self, where: str, stored: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]):
        self.where = where
        # generic key (no prefix, stacked) -> (stored key, global shape, dtype)
        self.prefix, plain = _strip_prefix(stored, where)
        self.keys = {k: (s, tuple(stored[s][0]), stored[s][1]) for k, s in plain.items()
                     if not k.endswith("_extra_state")}
        self._cache: Dict[str, torch.Tensor] = {}
        self._cached_layer = object()

    def shapes(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Generic (stacked) key -> (global shape, dtype)."""
        return {k: (shape, dtype) for k, (_, shape, dtype) in self.keys.items()}

    def get(self, name: str) -> torch.Tensor:
        key, layer = mapping.stacked_key(name)
        if key not in self.keys:
            raise CheckpointError(f"{self.where}: tensor {self.prefix}{key} is missing")
        if layer != self._cached_layer or name not in self._cache:
            if layer is None:
                group = [key]  # non-layer tensors are large (embeddings): one at a time
            else:  # every stacked tensor of this layer in one read
                group = [k for k in self.keys if k.startswith("decoder.layers.")]
            self._cache = {mapping.layer_name(k, layer): t
                           for k, t in self._load(group, layer).items()}
            self._cached_layer = layer
        return self._cache.pop(name)

    def _load(self, keys: List[str], layer: Optional[int]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


def check_torch_dist(weights_dir: str, in_place=None, fds: Optional[Dict[str, int]] = None):
    """Every pickle of a torch_dist checkpoint that Megatron's ``dist_checkpointing.load`` would
    unpickle without limits, read through ``nemo_minitron.checkpoint.untrusted`` first: the
    ``.metadata`` (allow-list), ``common.pt`` and each byte object (``_extra_state``, per-rank
    objects) with ``weights_only=True``. Returns the metadata; a hostile or corrupt file raises a
    one-line CheckpointError. Tensor chunks are read ``weights_only`` by whoever reads them.
    ``in_place``/``fds``: data files left in a .nemo tar (``opened_nemo``), cached descriptors
    (closed here when not given)."""
    from nemo_minitron.convert.nemo_file import FileView, open_member

    metadata = read_dcp_metadata(weights_dir)
    check_common(weights_dir)
    own_fds = fds is None
    fds = {} if own_fds else fds
    try:
        for index, info in metadata.storage_data.items():
            if hasattr(metadata.state_dict_metadata.get(index.fqn), "chunks"):
                continue  # a tensor chunk
            path = os.path.join(weights_dir, info.relative_path)
            fd, base, size = open_member(path, in_place, fds)
            if info.offset + info.length > size:
                raise CheckpointError(f"{path}: {index.fqn} lies beyond the end of the file "
                                      "(truncated?)")
            label = f"{path}: object {index.fqn}"
            try:
                load_weights_only(FileView(fd, base + info.offset, info.length), label)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt bytes
                raise CheckpointError(f"{label}: unreadable ({type(e).__name__}: "
                                      f"{_first_line(e)})") from None
    finally:
        if own_fds:
            for fd in fds.values():
                os.close(fd)
    return metadata


class TorchDistReader(_LayerCachedReader, OpenFiles):
    """torch_dist weights: DCP's ``.metadata`` (:func:`read_dcp_metadata`) locates
    every stored chunk (file, byte range; any chunking: per layer, per TP shard, gate/up halves);
    each chunk is one ``torch.save``'d tensor, loaded by ``torch.load`` straight from its byte range
    (of an extracted file or, ``in_place``, of the .nemo tar itself: no extraction pass), one
    layer's chunks at a time. A chunk that is exactly the requested region is returned as loaded
    (no copy); others are copied into place.

    Not ``dist_checkpointing.load``: in a 1-rank world Megatron's torch_dist strategy accepts only
    requests that cover the whole regular grid of a tensor (a whole ``[num_layers, ...]`` stack), which
    would hold e.g. 3.6 GB of 4B-Width's fc1 at once; no process group is needed either.
    """

    def __init__(self, weights_dir: str, in_place=None):
        self.weights_dir, self.in_place, self._fds = weights_dir, in_place, {}
        if not os.path.isfile(os.path.join(weights_dir, ".metadata")):
            raise CheckpointError(f"{weights_dir}: torch_dist checkpoint without .metadata")
        self.metadata = check_torch_dist(weights_dir, in_place, self._fds)
        tensors = {k: (tuple(v.size), v.properties.dtype)
                   for k, v in self.metadata.state_dict_metadata.items() if hasattr(v, "chunks")}
        self._storage = {(index.fqn, tuple(getattr(index, "offset", None) or ())): info
                         for index, info in self.metadata.storage_data.items()}
        for index, info in self.metadata.storage_data.items():
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{weights_dir}: {index.fqn} is stored with transforms "
                                      f"{info.transform_descriptors} (not supported)")
            path = os.path.join(weights_dir, info.relative_path)
            if index.fqn in tensors and not (os.path.isfile(path) or os.path.realpath(path)
                                             in (in_place or {})):
                raise CheckpointError(f"{path}: data file named in .metadata is missing")
        super().__init__(weights_dir, tensors)

    def _chunk_bytes(self, stored: str, chunk) -> Tuple[str, int, int, int]:
        """(path, fd, absolute offset, length) of one chunk's ``torch.save`` bytes."""
        from nemo_minitron.convert.nemo_file import open_member

        info = self._storage.get((stored, tuple(chunk.offsets)))
        if info is None:
            raise CheckpointError(f"{self.weights_dir}: {stored} chunk at {list(chunk.offsets)} "
                                  "has no storage entry")
        path = os.path.join(self.weights_dir, info.relative_path)
        fd, base, size = open_member(path, self.in_place, self._fds)
        if info.offset + info.length > size:
            raise CheckpointError(f"{path}: {stored} lies beyond the end of the file (truncated?)")
        return path, fd, base + info.offset, info.length

    def _read_chunk(self, stored: str, chunk, dtype) -> torch.Tensor:
        """The stored tensor of one chunk (its ``torch.save`` bytes loaded in place)."""
        from nemo_minitron.convert.nemo_file import FileView

        path, fd, start, length = self._chunk_bytes(stored, chunk)
        try:
            t = load_weights_only(FileView(fd, start, length), f"{path}: {stored}")
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: reading {stored} failed "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(chunk.sizes) \
                or t.dtype != dtype:
            raise CheckpointError(f"{path}: {stored} chunk at {list(chunk.offsets)} is not a "
                                  f"{list(chunk.sizes)} {dtype} tensor")
        return t

    def _load(self, keys, layer):
        out = {}
        for key in keys:
            stored, shape, dtype = self.keys[key]
            lo, hi = [0] * len(shape), list(shape)
            if layer is not None:
                lo[0], hi[0] = layer, layer + 1
            region = [h - l for l, h in zip(lo, hi)]
            pieces, covered = [], 0
            for chunk in self.metadata.state_dict_metadata[stored].chunks:
                start = [max(o, l) for o, l in zip(chunk.offsets, lo)]
                stop = [min(o + n, h) for o, n, h in zip(chunk.offsets, chunk.sizes, hi)]
                if any(a >= b for a, b in zip(start, stop)):
                    continue
                covered += int(np.prod([b - a for a, b in zip(start, stop)]))
                pieces.append((chunk, start, stop))
            if covered != int(np.prod(region)):  # chunks of one key never overlap
                raise CheckpointError(f"{self.weights_dir}: {stored} is incomplete (layer {layer}: "
                                      f"{covered} of {int(np.prod(region))} elements stored)")
            if len(pieces) == 1 and list(pieces[0][0].sizes) == region:
                out[key] = self._read_chunk(stored, pieces[0][0], dtype)  # the region itself
                continue
            out[key] = torch.empty(region, dtype=dtype)
            for chunk, start, stop in pieces:
                src, dst = self._read_chunk(stored, chunk, dtype), out[key]
                for dim, (a, b, o, l) in enumerate(zip(start, stop, chunk.offsets, lo)):
                    src, dst = src.narrow(dim, a - o, b - a), dst.narrow(dim, a - l, b - a)
                dst.copy_(src)
        return {k: (t[0] if layer is not None else t) for k, t in out.items()}


_STORAGE_DTYPES = {"BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "FloatStorage": torch.float32, "DoubleStorage": torch.float64}


class _RecordUnpickler(pickle.Unpickler):
    """The pickle of a ``torch.save``'d tensor, without its data: ``{"storage": (dtype, key,
    numel), "offset", "size", "stride"}``. Anything but a plain tensor of a known dtype raises."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: {
                "storage": storage, "offset": offset, "size": tuple(size), "stride": tuple(stride)}
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} in a tensor record")

    def persistent_load(self, pid):
        kind, storage_dtype, key, _, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"persistent id {kind!r}")
        return storage_dtype, key, numel


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


_ZARR_DTYPES = {"bfloat16": (np.uint16, torch.bfloat16), "<f4": (np.float32, torch.float32),
                "<f2": (np.float16, torch.float16), "<f8": (np.float64, torch.float64)}


class ZarrReader(_LayerCachedReader):
    """NeMo 24.05's default format, read without zarr: each key is a zarr v2 array directory
    (``.zarray``: shape, chunks, dtype ``"bfloat16"`` or numpy's, compressor null) of raw C-order
    chunk files named ``i.j.k``; megatron-core 0.7 writes one chunk per layer (and TP shard)."""

    def __init__(self, weights_dir: str):
        self.weights_dir = weights_dir
        self.arrays = {}
        check_common(weights_dir)  # refused like torch_dist's (the .pt objects are never read)
        for entry in sorted(os.listdir(weights_dir)):
            zarray = os.path.join(weights_dir, entry, ".zarray")
            if not os.path.isfile(zarray):
                continue
            try:
                with open(zarray) as f:
                    spec = json.load(f)
                shape, chunks, dtype = tuple(spec["shape"]), tuple(spec["chunks"]), spec["dtype"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{zarray}: not a zarr array header ({e})") from None
            if spec.get("compressor") is not None or spec.get("filters"):
                raise CheckpointError(f"{zarray}: compressed zarr arrays are not supported "
                                      "(megatron-core writes them uncompressed)")
            if dtype not in _ZARR_DTYPES or spec.get("order", "C") != "C":
                raise CheckpointError(f"{zarray}: dtype {dtype!r} / order {spec.get('order')!r} "
                                      "not supported")
            self.arrays[entry] = (shape, chunks, dtype, spec.get("dimension_separator", "."))
        if not self.arrays:
            raise CheckpointError(f"{weights_dir}: no zarr arrays")
        super().__init__(weights_dir, {k: (v[0], _ZARR_DTYPES[v[2]][1])
                                       for k, v in self.arrays.items()})

    def _read_region(self, stored: str, layer: Optional[int]) -> torch.Tensor:
        shape, chunks, dtype, sep = self.arrays[stored]
        np_dtype, torch_dtype = _ZARR_DTYPES[dtype]
        lo = [0] * len(shape)
        hi = list(shape)
        if layer is not None:
            lo[0], hi[0] = layer, layer + 1
        out = np.empty([h - l for l, h in zip(lo, hi)], dtype=np_dtype)
        grid = [range(l // c, -(-h // c)) for l, h, c in zip(lo, hi, chunks)]
        for index in np.ndindex(*[len(g) for g in grid]):
            cidx = [g[i] for g, i in zip(grid, index)]
            path = os.path.join(self.weights_dir, stored, sep.join(map(str, cidx)))
            expect = int(np.prod(chunks)) * np.dtype(np_dtype).itemsize
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError:
                raise CheckpointError(f"{path}: zarr chunk is missing") from None
            if len(raw) != expect:
                raise CheckpointError(f"{path}: zarr chunk has {len(raw)} bytes, expected {expect}")
            block = np.frombuffer(raw, dtype=np_dtype).reshape(chunks)
            src, dst = [], []
            for c, cs, l, h in zip(cidx, chunks, lo, hi):
                start, stop = max(c * cs, l), min((c + 1) * cs, h)
                src.append(slice(start - c * cs, stop - c * cs))
                dst.append(slice(start - l, stop - l))
            out[tuple(dst)] = block[tuple(src)]
        tensor = torch.from_numpy(out).view(torch_dtype)
        return tensor[0] if layer is not None else tensor

    def _load(self, keys, layer):
        return {k: self._read_region(self.keys[k][0], layer) for k in keys}
