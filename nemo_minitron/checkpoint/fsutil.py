"""Write outputs under a temporary name and rename them into place, so a failure never leaves a
half-written output and never destroys an existing one."""
from __future__ import annotations

import contextlib
import os
import shutil

from nemo_minitron.checkpoint import scratch
from nemo_minitron.errors import MinitronError
from nemo_minitron.lifecycle import libc


def _default_permissions(root: str) -> None:
    """mkdtemp makes 0700 directories; give the output the permissions of a normal mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False):
    """Yield a fresh temporary directory next to ``path``; on success rename it to ``path``.

    An existing ``path`` is an error unless ``overwrite``; it is replaced only after the new
    output is complete. On any exception the temporary directory is removed.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise MinitronError(f"{path} exists; pass --overwrite to replace it")
    parent, stem = os.path.dirname(path), f".{os.path.basename(path)}"
    os.makedirs(parent, exist_ok=True)
    # named after this process: a killed run's leftover is removed by the next run writing here
    tmp = scratch.make_dir(".tmp-", parent, stem=stem)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _default_permissions(tmp)
    if os.path.exists(path):
        old = scratch.make_dir(".old-", parent, stem=stem)
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def memory_scratch_dir(need_bytes: int, fallback: str) -> str:
    """``/dev/shm`` when it is a writable tmpfs with room for ``need_bytes`` plus 1 GB to spare,
    else ``fallback``: short-lived files there (written, read back, deleted) never reach the disk."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
    except OSError:
        return fallback
    if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize >= need_bytes + (1 << 30):
        return shm
    return fallback


def drop_mapped_pages(tensor) -> None:
    """Let the kernel drop the resident pages of a tensor that lives in a private file mapping it
    only reads (``torch.load(mmap=True)``): ``madvise(MADV_DONTNEED)`` on the whole pages inside
    its bytes. The data stays valid (a later access reads the file again); only the process's
    resident set shrinks, so a reader walking a large mmapped file holds one tensor's pages, not the
    file. Never call it on anonymous memory (its contents would be zeroed). No-op off Linux."""
    import mmap

    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo, hi = -(-start // page) * page, end // page * page
    lib = libc()
    if hi <= lo or lib is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    import ctypes

    lib.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)
