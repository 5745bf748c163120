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




class _Splicer:
    """vmsplice(2) + splice(2): a process's memory into a file at its current position, the pages
    handed to a pipe by reference and copied into the page cache by the kernel (as ``sendfile``
    does), instead of ``write(2)``'s copy out of the user mapping. Measured on the 2-core CI-class
    VM (1 GiB buffer, after dropping the page cache each time): 3.5-3.6 GiB/s against 0.8-1.05 for
    ``write``, 0.6-0.7 for write-to-pipe + splice and 0.6-0.8 for an mmap copy. One pipe per
    process (recreated after fork); None where the calls are missing (not Linux/glibc)."""

    PIPE_BYTES = 1 << 20

    def __init__(self):
        self.pid, self.pipe, self.vmsplice = None, None, None

    def _setup(self) -> bool:
        if self.pid == os.getpid():
            return self.pipe is not None
        self.pid, self.pipe = os.getpid(), None
        try:
            import ctypes
            import fcntl

            vmsplice = libc().vmsplice
            vmsplice.restype = ctypes.c_ssize_t
            vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            if not hasattr(os, "splice"):
                return False
            r, w = os.pipe()
            try:  # F_SETPIPE_SZ; the default 64 KiB pipe works too, with more calls
                fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), self.PIPE_BYTES)
            except OSError:
                pass
        except (OSError, AttributeError, ImportError):  # AttributeError: no libc / no vmsplice
            return False
        self.pipe, self.vmsplice, self.ctypes = (r, w), vmsplice, ctypes
        return True

    def write(self, fd: int, view: memoryview) -> bool:
        """Write all of ``view`` (contiguous bytes) to ``fd``; False (nothing written) where
        splicing is unavailable or refused, so the caller falls back to ``os.write``."""
        if view.nbytes == 0 or not self._setup():
            return view.nbytes == 0
        import numpy as np

        ctypes = self.ctypes

        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        base = np.frombuffer(view, dtype=np.uint8).ctypes.data  # read-only buffers too
        r, w = self.pipe
        done = 0
        while done < view.nbytes:
            iov = IoVec(base + done, min(view.nbytes - done, self.PIPE_BYTES))
            n = self.vmsplice(w, ctypes.byref(iov), 1, 0)
            if n <= 0:
                if done == 0:
                    return False  # e.g. EINVAL under a seccomp profile: plain write instead
                raise OSError(ctypes.get_errno(), "vmsplice failed mid-write")
            moved = 0
            while moved < n:  # splice copies the referenced pages before the buffer is reused
                step = os.splice(r, fd, n - moved)
                if step <= 0:
                    raise OSError(f"splice moved {step} bytes")
                moved += step
            done += n
        return True


_SPLICER = _Splicer()


def write_all(fd: int, data) -> int:
    """Write the bytes-like ``data`` to ``fd`` at its position (shared with forked children); for
    large buffers through :class:`_Splicer` where available. Returns the number of bytes."""
    view = memoryview(data).cast("B")
    if view.nbytes >= (1 << 20) and view.c_contiguous and _SPLICER.write(fd, view):
        return view.nbytes
    done = 0
    while done < view.nbytes:
        done += os.write(fd, view[done:done + (1 << 30)])
    return done


def send_all(out_fd: int, in_fd: int, offset: int, count: int) -> int:
    """Append ``count`` bytes at ``offset`` of the file ``in_fd`` to ``out_fd`` at its position,
    copied by the kernel (``sendfile``: page cache to page cache, no pass through a user mapping).
    Returns the bytes copied: fewer than ``count`` only where the source ends first (the caller
    names that error)."""
    done = 0
    while done < count:
        sent = os.sendfile(out_fd, in_fd, offset + done, min(count - done, 1 << 30))
        if sent <= 0:
            break
        done += sent
    return done


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
