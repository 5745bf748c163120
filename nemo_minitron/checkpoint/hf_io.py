"""HF checkpoint directories: sharded ``*.safetensors`` + ``model.safetensors.index.json``.

The layout of the released repos: ``model-0000K-of-0000N.safetensors`` shards (safetensors metadata
``{"format": "pt"}``) and an index ``{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}``;
a single ``model.safetensors`` without index is also read.
"""
from __future__ import annotations

import json
import mmap
import os
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from nemo_minitron.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors_shards(tensors: Iterable[Tuple[str, torch.Tensor]], out_dir: str, *,
                             max_shard_bytes: int = 5 * 10**9) -> Dict[str, str]:
    """Write ``(name, tensor)`` pairs in order into shards of at most ``max_shard_bytes`` (a larger
    single tensor gets a shard of its own) plus the index; return the weight map.

    Holds at most one shard's tensors in memory. Shards are written under temporary names and
    renamed once their count is known.
    """
    from safetensors.torch import save_file

    pending: List[Tuple[str, torch.Tensor]] = []
    pending_bytes = 0
    written: List[Tuple[str, List[str]]] = []  # (temporary file, names)
    total = 0

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        tmp = os.path.join(out_dir, f".shard-{len(written):05d}.tmp")
        save_file({n: t.contiguous() for n, t in pending}, tmp, metadata={"format": "pt"})
        written.append((tmp, [n for n, _ in pending]))
        pending, pending_bytes = [], 0

    seen = set()
    for name, tensor in tensors:
        if name in seen:
            raise CheckpointError(f"tensor {name} written twice")
        seen.add(name)
        size = _nbytes(tensor)
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending.append((name, tensor))
        pending_bytes += size
        total += size
    flush()
    weight_map: Dict[str, str] = {}
    count = len(written)
    for k, (tmp, names) in enumerate(written, start=1):
        final = f"model-{k:05d}-of-{count:05d}.safetensors"
        os.rename(tmp, os.path.join(out_dir, final))
        weight_map.update({n: final for n in names})
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return weight_map


def read_weight_map(hf_dir: str) -> Dict[str, str]:
    """tensor name -> shard file, validated against the shards' own headers."""
    from safetensors import safe_open

    index = os.path.join(hf_dir, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    elif os.path.isfile(os.path.join(hf_dir, SINGLE_NAME)):
        weight_map = None
    else:
        raise CheckpointError(f"{hf_dir}: no {INDEX_NAME} or {SINGLE_NAME}")
    shards = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
    actual: Dict[str, str] = {}
    for shard in shards:
        path = os.path.join(hf_dir, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard named in {INDEX_NAME} is missing")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in actual:
                        raise CheckpointError(f"{name} is stored in both {actual[name]} and {shard}")
                    actual[name] = shard
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if weight_map is not None and weight_map != actual:
        diff = sorted(k for k in set(weight_map) | set(actual) if weight_map.get(k) != actual.get(k))
        raise CheckpointError(f"{index} disagrees with the shards for {len(diff)} tensor(s), "
                              f"e.g. {', '.join(diff[:3])}")
    return actual


def read_shapes(hf_dir: str, weight_map: Optional[Dict[str, str]] = None) -> Dict[str, tuple]:
    """Tensor name -> shape, from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    weight_map = weight_map or read_weight_map(hf_dir)
    shapes = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(hf_dir, shard), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def iter_tensors(hf_dir: str, weight_map: Optional[Dict[str, str]] = None
                 ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield every tensor, one at a time, shard by shard."""
    from safetensors import safe_open

    weight_map = weight_map or read_weight_map(hf_dir)
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(hf_dir, shard), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# safetensors dtype names -> torch dtypes (the ones a Llama checkpoint can hold)
_ST_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
             "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(path: str) -> Tuple[int, Dict[str, dict]]:
    """(byte offset of the data section, {name: {"dtype", "shape", "data_offsets"}}) of a
    safetensors file: an 8-byte little-endian header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def pread_into(fd: int, buf: torch.Tensor, offset: int, where: str) -> torch.Tensor:
    """Fill the contiguous CPU tensor ``buf`` with the bytes at ``offset`` of ``fd``."""
    view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(f"{where}: file ends {len(view) - done} bytes early")
        done += got
    return buf


class OpenFiles:
    """Readers that keep file descriptors open in ``self._fds`` (name -> fd) until closed."""

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():  # also after a failed __init__
            os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()


class SafetensorsDir(OpenFiles):
    """``reader(name)``: one tensor of an HF safetensors directory, read on demand.

    Each tensor is its own private (copy-on-write) mapping of exactly its bytes, located by the
    shards' JSON headers: no copy, the pages are file-backed (clean page cache the kernel can
    reclaim), and they leave the process when the tensor is freed. (``safe_open`` maps every shard
    whole; every page a conversion touches then stays in its RSS until the handle closes: 5.7 GB
    of the 9 GB 4B-Width measured.)
    """

    def __init__(self, hf_dir: str, weight_map: Optional[Dict[str, str]] = None):
        self.hf_dir = hf_dir
        self.weight_map = weight_map or read_weight_map(hf_dir)
        self._fds: Dict[str, int] = {}
        self._headers: Dict[str, Tuple[int, Dict[str, dict]]] = {}
        for shard in sorted(set(self.weight_map.values())):
            path = os.path.join(hf_dir, shard)
            self._headers[shard] = read_header(path)
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger read-ahead
            self._fds[shard] = fd

    def __call__(self, name: str) -> torch.Tensor:
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.hf_dir}: tensor {name} is missing") from None
        start, header = self._headers[shard]
        spec = header[name]
        if spec["dtype"] not in _ST_TORCH:
            raise CheckpointError(f"{self.hf_dir}/{shard}: {name} has unsupported dtype "
                                  f"{spec['dtype']}")
        dtype = _ST_TORCH[spec["dtype"]]
        begin, end = spec["data_offsets"]
        count = int(torch.Size(spec["shape"]).numel())
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{self.hf_dir}/{shard}: {name} stores {end - begin} bytes for "
                                  f"shape {spec['shape']} {spec['dtype']}")
        fd, where = self._fds[shard], start + begin
        if count == 0 or where + end - begin > os.fstat(fd).st_size:  # empty, or cut short
            return pread_into(fd, torch.empty(spec["shape"], dtype=dtype), where,
                              f"{self.hf_dir}/{shard}")
        # a private mapping of just this tensor's pages: no copy, file-backed (reclaimable) pages,
        # unmapped when the tensor is freed
        skew = where % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, end - begin + skew, access=mmap.ACCESS_COPY, offset=where - skew)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=skew).view(spec["shape"])

# torch dtype -> safetensors name, for the dtypes the converters write
_ST_DTYPES = {t: n for n, t in _ST_TORCH.items() if t in (torch.bfloat16, torch.float16,
                                                           torch.float32)}


def plan_shards(specs: List[Tuple[str, tuple, torch.dtype]], max_shard_bytes: int
                ) -> List[List[Tuple[str, tuple, torch.dtype]]]:
    """Greedy split of ``(name, shape, dtype)`` in order into shards of <= max_shard_bytes (a larger
    tensor alone) -- the same split :func:`write_safetensors_shards` makes."""
    shards, current, size = [], [], 0
    for spec in specs:
        n = int(torch.Size(spec[1]).numel()) * torch.empty(0, dtype=spec[2]).element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += n
    if current:
        shards.append(current)
    return shards


def write_safetensors_streaming(specs: List[Tuple[str, tuple, torch.dtype]],
                                tensors: Iterable[Tuple[str, torch.Tensor]],
                                out_dir: str, *,
                                max_shard_bytes: int = 5 * 10**9,
                                on_tensor=None) -> Dict[str, str]:
    """Write sharded safetensors + index holding one tensor in memory at a time.

    Every name, shape and dtype is known up front (``specs``, in the order ``tensors`` yields
    them), so each shard's header (JSON: name -> dtype, shape, byte offsets; padded to 8 bytes as
    the safetensors library pads it) is written first and the tensors' bytes are appended as they
    arrive. A tensor that disagrees with its spec is an error.
    """
    import json as _json

    shards = plan_shards(specs, max_shard_bytes)
    count = len(shards)
    weight_map: Dict[str, str] = {}
    total = 0
    it = iter(tensors)
    for k, shard in enumerate(shards, start=1):
        final = f"model-{k:05d}-of-{count:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = _json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out_dir, final), "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype in shard:
                try:
                    got_name, tensor = next(it)
                except StopIteration:
                    raise CheckpointError(f"tensor {name} was never produced") from None
                if got_name != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise CheckpointError(f"produced {got_name} {list(tensor.shape)} {tensor.dtype}, "
                                          f"expected {name} {list(shape)} {dtype}")
                nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
                if tensor.numel():
                    f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy())
                weight_map[name] = final
                total += nbytes
                if on_tensor is not None:
                    on_tensor(nbytes)
    extra = next(it, None)
    if extra is not None:
        raise CheckpointError(f"unexpected extra tensor {extra[0]}")
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        _json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return weight_map
