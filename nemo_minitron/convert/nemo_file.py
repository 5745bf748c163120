"""The .nemo container: an uncompressed tar (gzip also read) of ``model_config.yaml``, the weights
and (ours) the HF tokenizer files; or the same tree extracted into a directory.

Extraction is safe: members that would land outside the target (absolute paths, ``..``), links and
device files are refused, and a truncated or corrupt archive is one error. Packing writes to a
temporary name and renames, so a failed conversion never leaves a half-written .nemo.

Weight layouts, by what exists (NeMo's own rule, shared/FACTS.md section 3):
``model_weights/`` with ``metadata.json`` (torch_dist or zarr), ``model_weights.ckpt`` (legacy TP=PP=1),
``mp_rank_XX/model_weights.ckpt`` (TP>1) or ``tp_rank_XX_pp_rank_XXX/model_weights.ckpt`` (PP>1).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tarfile
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

from nemo_minitron.checkpoint import scratch
from nemo_minitron.errors import CheckpointError, MinitronError

CONFIG_NAME = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
LEGACY_NAME = "model_weights.ckpt"
TOKENIZER_DIR = "tokenizer"  # our packed HF tokenizer files, referenced from model_config.yaml
_MP_RE = re.compile(r"^mp_rank_(\d{2})$")
_TP_PP_RE = re.compile(r"^tp_rank_(\d{2})_pp_rank_(\d{3})$")
# extracted path (realpath) -> (archive, offset of the member's data, size): members read in place
InPlace = Dict[str, Tuple[str, int, int]]


def safe_extract(archive: str, target: str, in_place: Optional[InPlace] = None,
                 select: Optional[Callable[[str], bool]] = None) -> int:
    """Extract ``archive`` (tar or tar.gz) into the existing directory ``target``; return the
    number of regular files written.

    ``in_place``: when given and the archive is an uncompressed tar, the distributed checkpoint's
    data files (``*.distcp``, nearly all the bytes) are not extracted; ``in_place`` maps each one's
    would-be path (realpath) to ``(archive, byte offset of its data, size)`` for readers that read
    them where they are (:func:`open_member`). ``select(name)``: only the members it accepts
    (by their normalized name) are extracted, each checked as in a full extraction."""
    root = os.path.realpath(target)
    mode = "r:*"
    if in_place is not None:
        with open(archive, "rb") as f:
            if f.read(2) == b"\x1f\x8b":  # gzip: offsets are not file offsets
                in_place = None
            else:
                mode = "r:"
    written = 0
    try:
        with tarfile.open(archive, mode) as tar:
            for member in tar:
                name = member.name
                if select is not None and not select(os.path.normpath(name)):
                    continue
                dest = os.path.realpath(os.path.join(root, name))
                if os.path.isabs(name) or not (dest == root or dest.startswith(root + os.sep)):
                    raise CheckpointError(f"{archive}: member {name!r} would be extracted outside "
                                          "the target directory; refusing")
                if member.issym() or member.islnk():
                    raise CheckpointError(f"{archive}: member {name!r} is a link; refusing")
                if member.isdir():
                    os.makedirs(dest, exist_ok=True)
                    continue
                if not member.isfile():
                    raise CheckpointError(f"{archive}: member {name!r} is not a regular file; "
                                          "refusing")
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                if in_place is not None and name.endswith(".distcp") and not member.issparse():
                    if member.offset_data + member.size > os.path.getsize(archive):
                        raise CheckpointError(f"{archive}: member {name!r} is truncated")
                    in_place[dest] = (os.path.abspath(archive), member.offset_data, member.size)
                    continue
                src = tar.extractfile(member)
                with open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 16 << 20)
                if os.path.getsize(dest) != member.size:
                    raise CheckpointError(f"{archive}: member {name!r} is truncated")
                written += 1
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""  # "r:*" lists every method it tried
        raise CheckpointError(f"{archive}: not a readable .nemo (tar) file "
                              f"({type(e).__name__}: {first})") from None
    return written


@contextlib.contextmanager
def opened_nemo(path: str, in_place: Optional[InPlace] = None) -> Iterator[str]:
    """Yield a directory holding the .nemo's tree: the directory itself, or a temporary extraction
    (next to the archive's default temp dir; removed afterwards). ``in_place``: see
    :func:`safe_extract` (readers then go through :func:`open_member`)."""
    if os.path.isdir(path):
        yield content_root(path)
        return
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such .nemo file or directory")
    tmp = scratch.make_dir("nemo-extract-")  # a killed run's extraction goes with the next one
    try:
        safe_extract(path, tmp, in_place)
        yield content_root(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def content_root(directory: str) -> str:
    """NeMo tars ``./model_config.yaml``; some tools add one top-level folder."""
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return directory
    entries = [e for e in os.listdir(directory) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isfile(os.path.join(directory, entries[0], CONFIG_NAME)):
        return os.path.join(directory, entries[0])
    raise CheckpointError(f"{directory}: no {CONFIG_NAME} (not a .nemo tree)")


def detect_layout(root: str) -> Tuple[str, int, int]:
    """(layout, tp, pp) of the weights under an extracted .nemo: layout is ``torch_dist``,
    ``zarr`` or ``legacy`` (tp/pp: the per-rank files' layout; 1, 1 for a distributed checkpoint)."""
    from nemo_minitron.convert.dist_ckpt import read_backend

    weights = os.path.join(root, WEIGHTS_DIR)
    if os.path.isdir(weights):
        return read_backend(weights), 1, 1
    if os.path.isfile(os.path.join(root, LEGACY_NAME)):
        return "legacy", 1, 1
    ranks = []
    for entry in os.listdir(root):
        m, m2 = _MP_RE.match(entry), _TP_PP_RE.match(entry)
        if m:
            ranks.append((int(m.group(1)), 0))
        elif m2:
            ranks.append((int(m2.group(1)), int(m2.group(2))))
    if not ranks:
        raise CheckpointError(f"{root}: no weights ({WEIGHTS_DIR}/, {LEGACY_NAME}, mp_rank_XX/ or "
                              "tp_rank_XX_pp_rank_XXX/)")
    tp = max(r[0] for r in ranks) + 1
    pp = max(r[1] for r in ranks) + 1
    if len(set(ranks)) != tp * pp:
        raise CheckpointError(f"{root}: per-rank weight directories are incomplete: found "
                              f"{sorted(ranks)} for TP={tp} PP={pp}")
    return "legacy", tp, pp


def rank_file(root: str, tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """Path of a legacy weights file, named as NeMo names it for the layout."""
    if tp == 1 and pp == 1:
        return os.path.join(root, LEGACY_NAME)
    if pp == 1:
        return os.path.join(root, f"mp_rank_{tp_rank:02d}", LEGACY_NAME)
    return os.path.join(root, f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}", LEGACY_NAME)


class FileView(io.RawIOBase):
    """Read-only, seekable view of ``length`` bytes at ``base`` of an open file descriptor
    (``pread``: no shared file position, so views of one descriptor are independent)."""

    def __init__(self, fd: int, base: int, length: int):
        super().__init__()
        self.fd, self.base, self.length, self.pos = fd, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence] + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(memoryview(buf).nbytes, self.length - self.pos))
        if n == 0:
            return 0
        got = os.preadv(self.fd, [memoryview(buf).cast("B")[:n]], self.base + self.pos)
        self.pos += got
        return got


def open_member(path: str, in_place: Optional[InPlace], fds: Dict[str, int]) -> Tuple[int, int, int]:
    """(descriptor, base offset, size) of an extracted file or of a member left in its archive;
    descriptors are cached in ``fds`` (archive or file path -> fd; the caller closes them)."""
    real = os.path.realpath(path)
    where, base, size = (in_place or {}).get(real) or (real, 0, None)
    if where not in fds:
        try:
            fds[where] = os.open(where, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    if size is None:
        size = os.fstat(fds[where]).st_size
    return fds[where], base, size


class NemoTarWriter:
    """A .nemo (uncompressed tar) written member by member, as its files become ready.

    Written under a temporary name next to ``out_path`` and renamed into place by :meth:`commit`
    (the context manager commits on success and removes the temporary file on error). Headers
    come from ``tarfile.TarInfo``; file contents are copied through one reused 16 MiB buffer (a
    fresh buffer per read costs a page fault per 4 KiB first touched: 2-4x slower on the VMs that
    hand free memory back to their hypervisor).
    """

    def __init__(self, out_path: str, overwrite: bool = False):
        self.out_path = os.path.abspath(out_path)
        if os.path.exists(self.out_path) and not overwrite:
            raise MinitronError(f"{self.out_path} exists; pass --overwrite to replace it")
        # named after this process: a killed run's partial archive is removed by the next run
        # writing in this directory (checkpoint/scratch.py)
        fd, self.tmp = scratch.make_file(".tmp-", os.path.dirname(self.out_path),
                                         stem=f".{os.path.basename(self.out_path)}")
        self.file = open(fd, "wb")
        self._buffer = bytearray(16 << 20)

    def _header(self, name: str, kind: bytes, size: int, mode: int, mtime: float) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mode, info.mtime = kind, size, mode, int(mtime)
        self.file.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add_dir(self, arcname: str) -> None:
        self._header(arcname, tarfile.DIRTYPE, 0, 0o755, time.time())

    def add_file(self, path: str, arcname: str) -> None:
        with open(path, "rb", buffering=0) as src:
            st = os.fstat(src.fileno())
            self._header(arcname, tarfile.REGTYPE, st.st_size, st.st_mode & 0o7777, st.st_mtime)
            view, copied = memoryview(self._buffer), 0
            while True:
                n = src.readinto(self._buffer)
                if not n:
                    break
                self.file.write(view[:n])
                copied += n
            if copied != st.st_size:
                raise CheckpointError(f"{path}: changed size while being packed")
        self.file.write(bytes(-st.st_size % tarfile.BLOCKSIZE))

    def add_tree(self, src_dir: str, arcname: str = ".") -> None:
        """The entries of ``src_dir`` (recursively, sorted) under ``arcname``."""
        for entry in sorted(os.listdir(src_dir)):
            path, name = os.path.join(src_dir, entry), f"{arcname}/{entry}"
            if os.path.isdir(path):
                self.add_dir(name)
                self.add_tree(path, name)
            else:
                self.add_file(path, name)

    def commit(self) -> None:
        """End-of-archive blocks, padding to a whole tar record, permissions, rename."""
        end = self.file.tell() + 2 * tarfile.BLOCKSIZE
        self.file.write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self.file.close()
        self.file = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        os.replace(self.tmp, self.out_path)

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def __enter__(self) -> "NemoTarWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def pack_nemo(src_dir: str, out_path: str, overwrite: bool = False) -> None:
    """Tar ``src_dir``'s contents (uncompressed, as NeMo writes) into ``out_path`` atomically."""
    with NemoTarWriter(out_path, overwrite=overwrite) as tar:
        tar.add_tree(src_dir)
