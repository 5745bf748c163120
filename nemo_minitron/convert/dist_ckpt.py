"""NeMo's distributed-checkpoint weights (``model_weights/``): written through Megatron-Core's
``dist_checkpointing`` (torch_dist), read back as torch_dist or as NeMo 24.05's zarr.

Layout (shared/FACTS.md section 3): keys carry the prefix ``model.``; per-layer tensors are stacked,
``model.decoder.layers.mlp.linear_fc1.weight [num_layers, 2*ffn, hidden]``, each layer one chunk at
offset ``(layer, 0, 0)`` (what a TP=1/PP=1 GPTModel's sharded state dict holds); embedding and output
layer are ``[padded_vocab, hidden]``; ``_extra_state`` objects per layer for linear_qkv/proj/fc1/fc2.

Streaming write: one ``dist_checkpointing.save`` per chunk of tensors (the embedding, a run of
consecutive layers, the output layer), each into a scratch directory; each chunk's one ``.distcp``
data file is written by Megatron's writer straight into a member of the .nemo tar (hf-to-nemo: the
writer's ``open`` of that file is redirected, so the bytes are written once) or moved into
``model_weights/``, and the chunks' DCP ``.metadata`` are merged into one. The saves are Megatron's
async requests: the writing part of chunk k runs in a forked process (as Megatron's own async
caller runs it) while the caller produces chunk k+1; its finalize functions run here once it is
done. Peak memory is two chunks, not the model. A chunk holding layers [a, b) saves each stacked
key as a ``[b - a, ...]`` tensor (Megatron's torch_dist strategy insists that a rank's shards form
a complete regular grid, so in a 1-rank world a chunk cannot declare the full
``[num_layers, ...]`` shape); the merge shifts those chunks' offsets by ``a`` and sets the global
size to ``num_layers``. DCP stores every shard as its own item, addressed only through this
metadata, so the shift is the whole change. Every data file holds the bytes Megatron's writer
produced (a test compares them with the files it writes when left alone); only the metadata is
re-assembled, and the tests load the result with Megatron's own ``dist_checkpointing.load``
(current stack and megatron-core 0.7.0 / torch 2.3).

torch 2.3 compatibility: the merged ``Metadata`` is pickled without its ``storage_meta`` attribute,
whose class (``StorageMeta``) torch 2.3 lacks (``AttributeError: Can't get attribute 'StorageMeta'``).
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import io
import json
import os
import pickle
import queue
import shutil
import threading
from typing import (Callable, ContextManager, Dict, Iterable, Iterator, List, Optional,
                    Sequence, Tuple)

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


def run_with_process_group(fn, *args, bytes_only: bool = False):
    """``fn(*args)`` where torch.distributed and Megatron's parallel state are initialized.

    Inside a job that has a process group: called directly. Otherwise in a forked child that
    creates a 1-rank gloo group (and the CPU shim), runs ``fn`` and exits: a process that has used
    torch.distributed cannot safely fork afterwards (measured: forked gloo workers then hang), so
    the caller's process never initializes it. The child's exception is re-raised here.

    ``bytes_only=True``, a child that only moves checkpoint bytes between files and CPU memory:
      * it never touches a GPU: CUDA is hidden (``CUDA_VISIBLE_DEVICES=""``, before anything in it
        initializes CUDA) and the group is gloo over the CPU shim, exactly as on a machine without
        one. With CUDA visible it would create a CUDA context and an NCCL group for nothing
        (measured on an H200 host: the tiny checkpoint's hf-to-nemo took 13.6 s);
      * ``torch.compile`` returns the function unchanged, so importing megatron-core does not
        import torch's compiler stack for the fused kernels it decorates and that such a child
        never calls (measured: 2.2 s -> 0.8 s for importing megatron-core 0.16 with its CPU shim).
    """
    import multiprocessing
    import torch.distributed as dist

    from nemo_minitron import lifecycle

    if dist.is_initialized():
        return fn(*args)
    lifecycle.tie_children()  # the child (and the writers it forks) die with this process
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(fn, args, send, bytes_only))
    child.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        status, payload = "error", CheckpointError(f"conversion process died (exit code "
                                                   f"{child.join() or child.exitcode})")
    child.join()
    if status == "error":
        raise payload
    return pickle.loads(payload)


def _no_compile(model=None, **_):
    return model if model is not None else (lambda fn: fn)


def _child(fn, args, send, bytes_only=False):
    from nemo_minitron.dist import destroy_megatron, free_port, init_megatron

    try:
        if bytes_only:
            torch.compile = _no_compile
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA initializes: not yet here
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork()
        for var in [v for v in os.environ if v.startswith(("SLURM_", "TORCHELASTIC_"))]:
            del os.environ[var]  # a world of one, whatever launched the parent
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        for attempt in range(5):  # the free port can be taken by another process before we bind
            os.environ["MASTER_PORT"] = str(free_port())
            try:
                init_megatron(tp=1, pp=1, rendezvous=False)
                break
            except RuntimeError as e:
                if attempt == 4 or "address already in use" not in str(e).lower() \
                        and "eaddrinuse" not in str(e).lower():
                    raise
        result = fn(*args)
        destroy_megatron()
        # plain pickle: tensors travel by value (multiprocessing's pickler would share them
        # through file descriptors that close with this process)
        send.send(("ok", pickle.dumps(result)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        if not isinstance(e, Exception) or not _picklable(e):
            e = CheckpointError(f"{type(e).__name__}: {e}")
        send.send(("error", e))
    finally:
        send.close()
        import multiprocessing

        for proc in multiprocessing.active_children():  # dist_checkpointing's writer manager
            proc.terminate()
            proc.join(5)
        os._exit(0)


def _picklable(e) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:  # noqa: BLE001
        return False


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
    # torch 2.3 cannot unpickle StorageMeta: leave the attribute out of the pickle entirely
    merged.__dict__.pop("storage_meta", None)
    return merged


def save_torch_dist(cfg: ModelConfig, chunks: Iterable[Sequence[Tuple[str, torch.Tensor]]],
                    out_dir: str, *,
                    member: Optional[Callable[[str], ContextManager[io.RawIOBase]]] = None,
                    scratch: Optional[str] = None,
                    file_region: Optional[Callable[[torch.Tensor], Optional[Tuple[int, int]]]] = None,
                    on_saved: Optional[Callable[[Sequence[Tuple[str, torch.Tensor]]], None]] = None
                    ) -> None:
    """Write ``model_weights/`` (``out_dir``, created here) from chunks of (layer-indexed
    checkpoint name, full tensor); every chunk is saved by ``dist_checkpointing.save`` (its data
    written by a forked process while the next chunk is produced: two chunks alive at most). The
    chunks are produced (and the HF files read) in the process that saves (see
    :func:`run_with_process_group`).

    Where each chunk's data file (``__<chunk>_0.distcp``) goes:
      * ``member(name)``: a context manager yielding a writable stream, e.g. a member of the .nemo
        tar (:meth:`NemoTarWriter.member`). Megatron's writer process writes the file's bytes
        straight into it (its ``open`` of the data file is redirected there while the chunk is
        saved): the same bytes it would write to the file, written once.
      * else it is moved into ``out_dir``.
    Each chunk is saved into a scratch directory under ``scratch`` (default ``out_dir``; a tmpfs
    such as /dev/shm keeps these files off the disk, and Megatron fsyncs every file it writes).
    ``common.pt``, ``.metadata`` and ``metadata.json`` always end up in ``out_dir``.

    ``file_region(tensor)``: ``(fd, offset)`` where a chunk tensor's bytes lie unchanged in a file
    (e.g. :meth:`SafetensorsDir.file_region`), or None; with ``member``, those bytes are copied
    from the file by the kernel. ``on_saved(chunk)`` is called once a chunk is on disk (its
    tensors' memory may be reused from then on)."""
    os.makedirs(out_dir)
    run_with_process_group(_save_chunks, cfg, chunks, out_dir, member, scratch or out_dir,
                           file_region, on_saved, bytes_only=True)


# (address, nbytes, (fd, file offset) or None) of a chunk tensor's storage
Region = Tuple[int, int, Optional[Tuple[int, int]]]


class _RedirectedDataFile(io.RawIOBase):
    """What Megatron's writer gets for its data file: writes and ``tell`` go to ``stream`` (e.g. a
    .nemo tar member); the file it asked for is created empty, and ``fileno`` is that file's, so
    Megatron's ``os.fsync`` of its data file syncs the (empty) scratch file, not the archive: one
    fsync per chunk would make every chunk wait for the disk instead of overlapping the writeback
    with reading and mapping the next chunk (the .nemo is renamed into place at the end, as NeMo
    does without an fsync; a plain save here behaves the same, its scratch is tmpfs).

    Writes are handed to one writer thread, in order, and ``write`` returns at once: torch's zip
    writer computes the CRC-32 of the next record (C++, without the GIL) while the thread copies
    the previous one into the archive, so the two passes over every byte run on two cores instead
    of one after the other. A buffer is passed on by reference only where it lies inside one of
    ``regions``, ``(address, nbytes, source)`` of the chunk's tensors, which outlive the save (the
    thread may read them after ``write`` returned); any other buffer (torch's headers, pickles,
    padding) is copied first. A region whose ``source`` is ``(fd, offset)`` holds exactly those
    bytes of that file (an unmodified mapping of an HF shard): the thread copies them from the
    file in the kernel (``stream.copy_from``, sendfile) instead of through the mapping.
    ``close`` waits for the thread and re-raises its error."""

    def __init__(self, stream, path: str, regions: Sequence[Region] = ()):
        super().__init__()
        self.stream, self.placeholder = stream, open(path, "wb")
        self.pos = stream.tell()
        self.regions = sorted(regions, key=lambda r: r[0])
        self._starts = [r[0] for r in self.regions]
        self._queue, self._thread, self._error = None, None, None

    def writable(self) -> bool:
        return True

    def _deferred(self, view: memoryview):
        """What the writer thread gets for ``view``: itself (or, for file bytes, ``(view, fd,
        offset)``) where it lies inside one of the chunk's tensors, else a copy."""
        if self.regions and view.nbytes:
            start = np.frombuffer(view, dtype=np.uint8).ctypes.data
            i = bisect.bisect_right(self._starts, start) - 1
            if i >= 0 and start + view.nbytes <= self.regions[i][0] + self.regions[i][1]:
                address, _, source = self.regions[i]
                if source is None or not hasattr(self.stream, "copy_from"):
                    return view
                return view, source[0], source[1] + start - address
        return bytes(view)

    def _drain(self) -> None:
        if self._thread is not None:
            self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    if isinstance(item, tuple):
                        view, fd, offset = item
                        self.stream.copy_from(fd, offset, view.nbytes)
                    else:
                        self.stream.write(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e
            finally:
                self._queue.task_done()

    def write(self, data) -> int:
        if self._error is not None:
            self._drain()
        view = memoryview(data).cast("B")
        n = view.nbytes
        if self._thread is None:  # started in the process that writes (Megatron's forked writer)
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._run, name="nemo-member-writer",
                                            daemon=True)
            self._thread.start()
        self._queue.put(self._deferred(view))
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        """Does not wait for the writer thread: ``torch.save`` flushes after every record, and
        waiting there would serialize the next record's CRC with this one's copy. The bytes are
        in the member once ``close`` returns (Megatron closes the file before reporting it)."""
        if self._error is not None:
            self._drain()

    def fileno(self) -> int:
        return self.placeholder.fileno()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._drain()
        finally:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None
            self.placeholder.close()
            super().close()


@contextlib.contextmanager
def _data_file_into(stream, scratch: str, regions: Sequence[Region] = ()) -> Iterator[None]:
    """While Megatron saves one chunk into ``scratch``: its writer's ``open(<scratch>/X.distcp,
    "wb")`` returns a :class:`_RedirectedDataFile` writing to ``stream``. Both megatron-core 0.7
    and 0.16 open the data file with the builtin ``open`` in ``strategies/filesystem_async.py``,
    in a writer process forked for the save; the name is shadowed in that module for the duration
    of the save (the forked writer inherits it). Every byte is the one Megatron's writer produces
    (``torch.distributed.checkpoint``'s ``_write_item``: ``torch.save`` per item); only its
    destination changes, so the data is written once, with no scratch copy. ``regions``: the
    chunk's tensor memory (see :class:`_RedirectedDataFile`)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    opened = []

    def redirected(path, mode="r", *args, **kwargs):
        path_s = os.fspath(path)
        if os.path.dirname(os.path.abspath(path_s)) == os.path.abspath(scratch) \
                and path_s.endswith(".distcp") and "w" in mode:
            if opened:
                raise CheckpointError(f"Megatron opened a second data file {path_s} for one chunk "
                                      f"(already {opened[0]})")
            opened.append(path_s)
            return _RedirectedDataFile(stream, path_s, regions)
        return open(path, mode, *args, **kwargs)

    if "open" in vars(filesystem_async):
        raise CheckpointError("megatron-core's filesystem_async already defines 'open'; "
                              "cannot redirect its data file")
    filesystem_async.open = redirected
    try:
        yield
    finally:
        del filesystem_async.open


def _copy_unredirected(scratch: str, stream) -> None:
    """A megatron-core that opened its data file some other way wrote it into ``scratch`` itself:
    copy it into the member (correct, one extra pass over the bytes)."""
    files = [f for f in os.listdir(scratch) if f.endswith(".distcp")
             and os.path.getsize(os.path.join(scratch, f)) > 0]
    if len(files) != 1:
        raise CheckpointError(f"Megatron's data file for {scratch} was neither redirected nor "
                              f"written once (found {files})")
    with open(os.path.join(scratch, files[0]), "rb") as f:
        for block in iter(lambda: f.read(64 << 20), b""):
            stream.write(block)


def _write_detached(write, args, kwargs, send) -> None:
    """In a forked process: the writing part of an async ``dist_checkpointing.save`` request."""
    try:
        write(*args, **kwargs)
        send.send(None)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        send.send(f"{type(e).__name__}: {_first_line(e)}")
    finally:
        send.close()
        os._exit(0)


def _async_call(request) -> Tuple[Callable, list, dict]:
    """(function, args, kwargs) that write an async request's data, staged as Megatron's own
    async caller (``TemporalAsyncCaller``) does before forking: ``preload_fn`` (megatron-core
    0.8+) replaces the write buckets with their host copies (the same tensors on a CPU)."""
    args = list(request.async_fn_args)
    if getattr(request, "preload_fn", None):
        args[1] = request.preload_fn()
    return request.async_fn, args, dict(getattr(request, "async_fn_kwargs", None) or {})


class _ChunkWrite:
    """One chunk's data file, written by a forked process (which runs Megatron's writer) while
    the caller produces the next chunk: reading and merging the HF tensors of chunk k+1 overlaps
    with writing chunk k, on the second core. ``finish`` waits, runs Megatron's finalize
    functions (write results, the chunk's ``.metadata``) and returns that metadata, shifted."""

    def __init__(self, cfg: ModelConfig, k: int, chunk, request, scratch: str, base: int,
                 member, file_region):
        import multiprocessing

        self.cfg, self.k, self.chunk, self.request = cfg, k, chunk, request
        self.scratch, self.base, self.name = scratch, base, f"__{k}_0.distcp"
        self.stack, self.stream, self.proc = contextlib.ExitStack(), None, None
        ctx = multiprocessing.get_context("fork")
        self.recv, send = ctx.Pipe(duplex=False)
        try:
            with contextlib.ExitStack() as redirect:
                if member is not None:
                    self.stream = self.stack.enter_context(member(self.name))
                    regions = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(),
                                file_region(t) if file_region else None) for _, t in chunk]
                    # the forked writer inherits the redirected open; the parent's is undone
                    redirect.enter_context(_data_file_into(self.stream, scratch, regions))
                self.proc = ctx.Process(target=_write_detached, args=(*_async_call(request), send))
                self.proc.start()
        except BaseException:
            self.abort()  # nobody else holds this job yet: close its member and pipe here
            raise
        finally:
            send.close()

    def finish(self):
        try:
            try:
                error = self.recv.recv()
            except EOFError:
                error = f"exit code {self.proc.join() or self.proc.exitcode}"
            self.proc.join()
            if error is not None:
                raise CheckpointError(f"writing chunk {self.k} failed: {error}")
            for finalize in self.request.finalize_fns:
                finalize()
            if self.stream is not None and self.stream.tell() == 0:
                _copy_unredirected(self.scratch, self.stream)
        finally:
            self.stack.close()  # the tar member's header, with its size
            self.recv.close()
        md = read_dcp_metadata(self.scratch, torch_classes=True)
        _shift(md, self.base, self.cfg.num_layers)
        files = sorted({info.relative_path for info in md.storage_data.values()})
        if len(files) != 1:
            raise CheckpointError(f"chunk {self.k}: Megatron wrote {len(files)} data files "
                                  f"({files[:3]}), expected one")
        return md, files[0]

    def abort(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.recv.close()
        self.stack.close()


def _save_chunks(cfg: ModelConfig, chunks, out_dir: str, member, scratch_root: str,
                 file_region=None, on_saved=None) -> None:
    """One async ``dist_checkpointing.save`` per chunk, written by a :class:`_ChunkWrite` while the
    next chunk is produced (at most two chunks alive; one data file written at a time, in order,
    so each goes into its own tar member)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from nemo_minitron import lifecycle
    from nemo_minitron.checkpoint import scratch

    lifecycle.tie_children()  # the chunk writers die with this process (also inside a job)
    _start_writer_manager()
    parts, written, scratches = [], set(), []
    pending: Optional[_ChunkWrite] = None

    def finish(job: _ChunkWrite) -> None:
        md, data_file = job.finish()
        if on_saved is not None:
            on_saved(job.chunk)
        if member is None:
            os.rename(os.path.join(job.scratch, data_file), os.path.join(out_dir, job.name))
        parts.append((md, {data_file: job.name}))
        if job.k == 0:
            shutil.move(os.path.join(job.scratch, "common.pt"), os.path.join(out_dir, "common.pt"))
        shutil.rmtree(job.scratch, ignore_errors=True)

    try:
        for k, chunk in enumerate(chunks):  # chunk k is produced while chunk k-1 is written
            names = [n for n, _ in chunk]
            dup = written.intersection(names)
            if dup:
                raise CheckpointError(f"tensor(s) written twice: {', '.join(sorted(dup))}")
            written.update(names)
            scratches.append(scratch.make_dir(".chunk-", scratch_root, stem=f".{k:05d}"))
            # thread_count=1: one .distcp file per chunk
            strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
            sharded, base = _sharded_chunk(cfg, chunk)
            # validate_access_integrity=False: the extra-state objects name their global layer
            # (shard_<layer>_<num_layers>), so a chunk holds only some of them
            request = dist_checkpointing.save(sharded, scratches[-1], sharded_strategy=strategy,
                                              validate_access_integrity=False,
                                              async_sharded_save=True)
            del sharded
            if pending is not None:
                job, pending = pending, None
                finish(job)
            pending = _ChunkWrite(cfg, k, chunk, request, scratches[-1], base, member, file_region)
            del chunk, request
        if pending is not None:
            job, pending = pending, None
            finish(job)
    finally:
        if pending is not None:
            pending.abort()
        for scratch in scratches:
            shutil.rmtree(scratch, ignore_errors=True)
    merged = _merge_metadata(parts)
    _check_coverage(cfg, merged, written)
    with open(os.path.join(out_dir, ".metadata"), "wb") as f:
        pickle.dump(merged, f)
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(METADATA_JSON, f)


def _start_writer_manager() -> None:
    """Start the result-queue manager process that megatron-core (0.8+) forks lazily at its first
    save, now, before any tensor exists: forked in the middle of the first save, it would keep the
    first chunk's pages copy-on-write for the whole conversion (measured: the 0.79 GB embedding,
    private to it once this process frees the chunk). Older megatron-core has no such manager."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = getattr(filesystem_async, "_get_write_results_queue", None)
    if start is not None:
        start()


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

    def file_rows(self, name: str):
        """Where the stored tensor of a layer-indexed name lies, as ``hf_io.FileRows``, when it is
        exactly one stored chunk kept as a plain C-order tensor (what hf-to-nemo and a TP=1
        NeMo save write); None otherwise (several chunks, e.g. TP shards, or an unusual record),
        and the caller reads it with :meth:`get`. Only the chunk's small pickle is read."""
        from nemo_minitron.checkpoint.hf_io import FileRows
        from nemo_minitron.convert.nemo_file import FileView

        key, layer = mapping.stacked_key(name)
        if key not in self.keys:
            return None
        stored, shape, dtype = self.keys[key]
        region = list(shape[1:]) if layer is not None else list(shape)
        offsets = [layer] + [0] * len(region) if layer is not None else [0] * len(region)
        want = [1] + region if layer is not None else region
        chunks = [c for c in self.metadata.state_dict_metadata[stored].chunks
                  if list(c.offsets) == offsets and list(c.sizes) == want]
        if len(chunks) != 1:
            return None
        _, fd, start, length = self._chunk_bytes(stored, chunks[0])
        try:
            record = torch._C.PyTorchFileReader(FileView(fd, start, length))
            found = _RecordUnpickler(io.BytesIO(bytes(record.get_record("data.pkl")))).load()
            storage_dtype, storage_key, numel = found["storage"]
            data = record.get_record_offset(f"data/{storage_key}")
        except Exception:  # noqa: BLE001 - any other record layout: read it the ordinary way
            return None
        count = int(np.prod(want))
        strides = [int(np.prod(want[i + 1:])) for i in range(len(want))]
        if storage_dtype != dtype or found["offset"] != 0 or list(found["size"]) != want \
                or list(found["stride"]) != strides or numel < count \
                or data + count * dtype.itemsize > length:
            return None
        return FileRows(fd, start + data, tuple(region), dtype)

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
