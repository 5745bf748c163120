"""Megatron's ``dist_checkpointing.load`` of a ``.nemo``'s torch_dist weights, each rank reading
only the bytes of its own shards, from the tar in place or from an extracted directory
(``model.source.ModelSource.load_into``).

Two hooks, both scoped to one load (megatron-core 0.7 / torch 2.3 and 0.16 / torch 2.13 alike):

- the load strategy, a ``TorchDistLoadShardedStrategy`` subclass passed as ``sharded_strategy=``,
  hands torch DCP's reader a ``Path`` subclass (:class:`_CheckpointPath`) whose ``open`` maps a
  ``.distcp`` file to its member's byte range in the tar: DCP opens every file as
  ``checkpoint_dir / name`` then ``Path.open``;
- the reader is a ``FileSystemReader`` subclass that reads, of each stored item, only the rows a
  request asks for: DCP's own reader ``torch.load``s every item whole and narrows it, so at TP=2
  every rank would read every layer of its stage whole. Megatron builds its reader from the
  directory alone inside ``load``, so that factory's name is rebound for the duration
  (:func:`_region_reader`).

An untrusted ``.nemo``: before Megatron or DCP reads anything,
``convert.dist_ckpt.check_torch_dist`` (run by the caller's ``TorchDistReader``) reads ``.metadata`` (allow-list), ``common.pt`` and every
byte object (``weights_only``), and :func:`check_tensor_records` reads the pickle of every tensor
record with a tensors-only unpickler (torch 2.3's DCP ``torch.load``s tensor records without
``weights_only``; the region reader never ``torch.load``s them). DCP's own unrestricted
``pickle.load`` of ``.metadata`` is given a pickle of the allow-listed objects, never the file;
any other file DCP asks for is refused.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import pathlib
import pickle
from typing import Dict, Iterator, Optional

import torch

from nemo_minitron.errors import CheckpointError


def check_coverage(metadata, weights_dir: str) -> None:
    """Every stored tensor's chunks cover it (DCP would leave an uncovered region of a requested
    shard unwritten); chunks of one tensor never overlap, so the element counts tell."""
    for key, smd in metadata.state_dict_metadata.items():
        if not hasattr(smd, "chunks"):
            continue
        covered = sum(int(torch.Size(c.sizes).numel()) for c in smd.chunks)
        if covered != int(torch.Size(smd.size).numel()):
            raise CheckpointError(f"{weights_dir}: {key} is incomplete: its stored chunks cover "
                                  f"{covered} of {int(torch.Size(smd.size).numel())} elements")


_ZIP_MAGIC = b"PK\x03\x04"


def check_tensor_records(weights_dir: str, metadata, in_place) -> None:
    """Every tensor record DCP may ``torch.load``: a zip whose ``data.pkl`` names a plain tensor
    only (read with ``dist_ckpt``'s tensors-only unpickler; the data bytes are not read). torch
    2.3's ``FileSystemReader`` loads these records without ``weights_only``; a record that is not
    a zip would even go to torch's legacy (unrestricted) loader, and one holding
    ``constants.pkl`` to TorchScript."""
    from nemo_minitron.convert.nemo_file import open_member

    fds: Dict[str, int] = {}
    try:
        for index, info in metadata.storage_data.items():
            if not hasattr(metadata.state_dict_metadata.get(index.fqn), "chunks"):
                continue  # a byte object: check_torch_dist read it weights_only
            path = os.path.join(weights_dir, info.relative_path)
            fd, base, size = open_member(path, in_place, fds)
            label = f"{path}: {index.fqn} record at {list(getattr(index, 'offset', None) or [])}"
            start = _record_start(info, base, size, label)
            try:
                if os.pread(fd, len(_ZIP_MAGIC), start) != _ZIP_MAGIC:
                    raise ValueError("not a torch.save zip record")
                record = _record_reader(fd, start, info.length)
                if record.has_record("constants.pkl"):
                    raise ValueError("a TorchScript archive")
                _record_pickle(record)
            except Exception as e:  # noqa: BLE001 - corrupt zips and refusals raise many types
                first = str(e).splitlines()[0] if str(e) else ""
                raise CheckpointError(f"{label}: refused: not a plain tensor record "
                                      f"({type(e).__name__}: {first}) (nothing in it was run)"
                                      ) from None
    finally:
        for fd in fds.values():
            os.close(fd)


def _record_start(info, base: int, size: int, label: str) -> int:
    """Where the ``torch.save`` record ``info`` (DCP storage info) starts in its file, checked to
    end inside it."""
    if info.offset + info.length > size:
        raise CheckpointError(f"{label} lies beyond the end of the file (truncated?)")
    return base + info.offset


def _record_reader(fd: int, start: int, length: int):
    """torch's zip reader over the ``torch.save`` record at ``start`` of ``fd`` (nothing read yet)."""
    from nemo_minitron.convert.nemo_file import FileView

    return torch._C.PyTorchFileReader(FileView(fd, start, length))


def _record_pickle(record):
    """The record's ``data.pkl``, read with ``dist_ckpt``'s tensors-only unpickler (it names the
    tensor's storage; the tensor data is not read)."""
    from nemo_minitron.convert.dist_ckpt import _RecordUnpickler

    return _RecordUnpickler(io.BytesIO(bytes(record.get_record("data.pkl")))).load()


class _MemberView(io.RawIOBase):
    """A read-only file over ``length`` bytes at ``base`` of the file ``where`` (its own descriptor,
    closed with the view): what DCP's reader gets for a ``.distcp`` left in the tar."""

    def __init__(self, where: str, base: int, length: int):
        from nemo_minitron.convert.nemo_file import FileView

        super().__init__()
        self._fd = os.open(where, os.O_RDONLY)
        self._view = FileView(self._fd, base, length)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return self._view.seek(pos, whence)

    def tell(self) -> int:
        return self._view.tell()

    def readinto(self, buf) -> int:
        return self._view.readinto(buf)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _CheckpointPath(pathlib.PosixPath):
    """The checkpoint directory as DCP's ``FileSystemReader`` sees it (``checkpoint_dir / name``
    keeps this class, ``FileSystem.create_stream`` calls ``open``). Per load, a subclass carries
    ``_files`` (realpath of each data file the metadata names -> ``(archive, offset, size)`` for
    a member left in the tar, or None for a file on disk) and ``_metadata`` (the allow-listed
    metadata, pickled again)."""

    _files: Dict[str, Optional[tuple]] = {}
    _metadata: bytes = b""

    def open(self, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise CheckpointError(f"{self}: the checkpoint is read only")
        if self.name == ".metadata":
            return io.BytesIO(self._metadata)
        real = os.path.realpath(self)
        if real not in self._files:
            raise CheckpointError(f"{self}: not a data file of the checkpoint's .metadata")
        where = self._files[real]
        if where is None:
            return super().open(mode, *args, **kwargs)
        return _MemberView(*where)


def megatron_load(model, weights_dir: str, in_place, prefix: str, label: str, skip=()):
    """``dist_checkpointing.load(model.sharded_state_dict(prefix=...))`` reading data files where
    they are (tar members in place); then strict: every parameter filled, except the ``skip``
    names (left to the caller)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    from nemo_minitron.checkpoint.untrusted import read_dcp_metadata
    from nemo_minitron.convert.dist_ckpt import torch23_metadata

    # allow-list again: the objects DCP gets, pickled without what torch 2.3 lacks
    metadata = torch23_metadata(read_dcp_metadata(weights_dir, torch_classes=True))
    files = {}
    for info in metadata.storage_data.values():
        path = os.path.realpath(os.path.join(weights_dir, info.relative_path))
        files[path] = (in_place or {}).get(path)
    path_cls = type("_CheckpointDir", (_CheckpointPath,),
                    {"_files": files, "_metadata": pickle.dumps(metadata)})

    class _InPlaceStrategy(TorchDistLoadShardedStrategy):
        # megatron-core 0.19 passes async_strategy too
        def load(self, sharded_state_dict, checkpoint_dir, *args, **kwargs):
            return super().load(sharded_state_dict, path_cls(os.fspath(checkpoint_dir)),
                                *args, **kwargs)

    sharded = {k: v for k, v in model.sharded_state_dict(prefix=prefix).items()
               if k[len(prefix):] not in skip}
    with _region_reader(path_cls):
        loaded = dist_checkpointing.load(sharded, weights_dir, sharded_strategy=_InPlaceStrategy())
    missing, unexpected = model.load_state_dict(
        {k[len(prefix):]: v for k, v in loaded.items()}, strict=False)
    missing = [k for k in missing if k not in skip]
    if missing or [k for k in unexpected if not k.endswith("_extra_state")]:
        raise CheckpointError(f"{label}: model parameters not filled: {missing[:4]}")
    return model


# ---- reading only the requested region of each stored item ---------------------------------------
@contextlib.contextmanager
def _region_reader(path_cls) -> Iterator[None]:
    """While Megatron's torch_dist strategy loads: the DCP reader it makes is a
    ``_RegionReader`` on ``path_cls``. Megatron builds its reader inside ``load`` from the
    directory alone (megatron-core 0.16: ``strategies.torch._get_filesystem_reader``; 0.7: the
    name ``FileSystemReader`` in that module), so the name is rebound for the duration of the
    load. A megatron-core with neither keeps its own reader, which reads through ``path_cls`` all
    the same (whole stored items: correct, more bytes). See :func:`_region_reader_class`."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as strategy

    def make(checkpoint_dir, *_args, **_kwargs):
        return _region_reader_class()(path_cls(os.fspath(checkpoint_dir)))

    rebound = []
    name = next((n for n in ("_get_filesystem_reader", "FileSystemReader")
                 if callable(vars(strategy).get(n))), None)
    if name is not None:
        rebound.append((strategy, name))
    # megatron-core 0.19: load_common_state_dict reads a checkpoint without common.pt (the common
    # state is a byte object in the data file) through serialization's own import of the factory
    if callable(vars(serialization).get("_get_filesystem_reader")):
        rebound.append((serialization, "_get_filesystem_reader"))
    saved = [(module, n, vars(module)[n]) for module, n in rebound]
    for module, n in rebound:
        setattr(module, n, make)
    try:
        yield
    finally:
        for module, n, old in saved:
            setattr(module, n, old)


@functools.lru_cache(maxsize=None)
def _region_reader_class():
    """:class:`_RegionReader`, made on first use (``torch.distributed.checkpoint`` takes half a
    second to import: not for jobs that never load a torch_dist .nemo)."""
    from torch.distributed.checkpoint import FileSystemReader

    class _RegionReader(FileSystemReader):
        """torch DCP's ``FileSystemReader``, except that a tensor request reads only the bytes
        of the region it asks for (DCP's ``torch.load``s each stored item whole and narrows it).
        A stored item is one ``torch.save`` record: its pickle is read with ``dist_ckpt``'s
        tensors-only unpickler (nothing is ``torch.load``ed), and of its data only the span of
        the requested rows (the first dimension not taken whole, under leading dimensions of
        size 1): a row-parallel shard (qkv, fc1, the vocabulary) is exactly its bytes, a
        column-parallel one (linear_proj, fc2) spans its rows. Byte objects go to DCP's own
        reading."""

        def read_data(self, plan, planner):
            import dataclasses
            from concurrent.futures import Future

            from torch.distributed.checkpoint.planner import LoadItemType

            objects = [r for r in plan.items if r.type == LoadItemType.BYTE_IO]
            fds: Dict[str, int] = {}
            try:
                for req in plan.items:
                    if req.type == LoadItemType.BYTE_IO:
                        continue
                    info = self.storage_data[req.storage_index]
                    tensor = _read_region(self.path, info, req.storage_offsets, req.lengths, fds)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise CheckpointError(f"{req.storage_index.fqn}: stored region "
                                              f"{list(tensor.shape)} does not fit "
                                              f"{list(target.shape)}")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
            finally:
                for fd in fds.values():
                    os.close(fd)
            if objects:
                return super().read_data(dataclasses.replace(plan, items=objects), planner)
            done: Future = Future()
            done.set_result(None)
            return done

    return _RegionReader


def _read_region(directory, info, offsets, lengths, fds: Dict[str, int]) -> torch.Tensor:
    """The region ``offsets``/``lengths`` of the tensor stored as ``info`` (a ``torch.save``
    record at ``info.offset`` of ``info.relative_path``), reading only its span."""
    from nemo_minitron.convert.nemo_file import open_member

    path = os.path.realpath(os.path.join(os.fspath(directory), info.relative_path))
    if path not in directory._files:
        raise CheckpointError(f"{path}: not a data file of the checkpoint's .metadata")
    fd, base, size = open_member(path, directory._files, fds)
    label = f"{path}: record at byte {info.offset}"
    start = _record_start(info, base, size, label)
    try:
        record = _record_reader(fd, start, info.length)
        found = _record_pickle(record)
        dtype, key, numel = found["storage"]
        data = start + record.get_record_offset(f"data/{key}")
    except Exception as e:  # noqa: BLE001 - check_tensor_records read these before: corrupt now
        raise CheckpointError(f"{label}: unreadable tensor record ({type(e).__name__})") from None
    shape, stride = list(found["size"]), list(found["stride"])
    contiguous = [int(torch.Size(shape[i + 1:]).numel()) for i in range(len(shape))]
    offsets, lengths = list(offsets), list(lengths)
    if stride != contiguous or found["offset"] + int(torch.Size(shape).numel()) > numel \
            or len(offsets) != len(shape):
        raise CheckpointError(f"{label}: not a plain C-order tensor of its storage")
    data += found["offset"] * dtype.itemsize
    if data + int(torch.Size(shape).numel()) * dtype.itemsize > start + info.length:
        raise CheckpointError(f"{label}: tensor data beyond the record (truncated?)")
    # the first dimension not taken whole; above it only dimensions of size 1: one span of rows
    partial = [i for i, (o, n, s) in enumerate(zip(offsets, lengths, shape)) if (o, n) != (0, s)]
    if partial and all(s == 1 for s in shape[:partial[0]]):
        k, first, rows = partial[0], offsets[partial[0]], lengths[partial[0]]
    else:  # whole, or rows of an outer dimension: the whole tensor
        k, first, rows = 0, 0, (shape[0] if shape else 1)
    out = torch.empty(([1] * k + [rows] + shape[k + 1:]) if shape else [], dtype=dtype)
    want = out.numel() * dtype.itemsize
    inner = contiguous[k] if shape else 1
    got = os.preadv(fd, [out.view(-1).view(torch.uint8).numpy()],
                    data + first * inner * dtype.itemsize) if want else 0
    if got != want:
        raise CheckpointError(f"{label}: read {got} of {want} bytes (truncated?)")
    for dim in range(len(shape)):
        local = offsets[dim] - (first if dim == k else 0)
        if (local, lengths[dim]) != (0, out.shape[dim]):
            out = out.narrow(dim, local, lengths[dim])
    return out
