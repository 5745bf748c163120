"""Write outputs under a temporary name and rename them into place, so a failure never leaves a
half-written output and never destroys an existing one."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from nemo_minitron.errors import MinitronError


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
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _default_permissions(tmp)
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
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
