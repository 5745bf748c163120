"""Temporary files and directories named after their owner, and the sweep of those left behind.

A process killed with SIGKILL cannot remove its temporary outputs (a ``.OUT.tmp-*`` as large as
the model, a staging directory, an extraction in ``/tmp``). Every such name made here carries its
owner: ``<stem><kind><host>-<pid>-<start>-<random>``, where ``start`` is the process's start time
(``/proc/<pid>/stat`` field 22, clock ticks since boot; 0 where there is no ``/proc``), so a pid
reused by a later process does not make a dead owner look alive. Before making a name,
:func:`make_dir` and :func:`make_file` remove the entries of the same kind in the same directory
whose owner is dead (:func:`sweep`), so the next run that writes there cleans up after a killed
one.

Only names of exactly this shape are ever removed, only those of this host (a shared filesystem
sees other hosts' pids, which cannot be checked from here), only those of this user, and never
one whose owner is alive.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import tempfile
from typing import List, Optional, Tuple

from nemo_minitron.errors import CheckpointError

_RANDOM = r"[a-z0-9_]{8}"  # tempfile's names: 8 characters of this alphabet


def process_start(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot, None if there is no such running process
    (none, or a zombie: dead, only not yet reaped by its parent) (0 where /proc is missing: only
    the pid is then checked)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else 0
    except OSError:
        return 0
    # the command name (field 2) may hold spaces and ')': the fields after the last ')' are fixed
    fields = text[text.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):  # dead; a container whose pid 1 does not reap keeps it so
        return None
    return int(fields[19])


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def owner_tag(pid: Optional[int] = None) -> str:
    """``<host>-<pid>-<start>`` of this process (or ``pid``)."""
    pid = os.getpid() if pid is None else pid
    return f"{_host()}-{pid}-{process_start(pid) or 0}"


def owner_alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    now = process_start(pid)
    return now is not None and (start == 0 or now == 0 or now == start)


def _pattern(kind: str) -> re.Pattern:
    return re.compile(rf"^.*{re.escape(kind)}{re.escape(_host())}-(\d+)-(\d+)-{_RANDOM}$")


def sweep(directory: Optional[str], kind: str) -> List[str]:
    """Remove the entries of ``directory`` (default: the system temp dir) named by this module with
    ``kind`` whose owner process on this host is dead; return their paths. Entries being removed
    by another sweep at the same time are skipped."""
    directory = directory or tempfile.gettempdir()
    pattern, uid, removed = _pattern(kind), os.getuid(), []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m is None or owner_alive(int(m.group(1)), int(m.group(2))):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if st.st_uid != uid:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path, onerror=_raise_unless_missing)
            else:
                os.unlink(path)
        except FileNotFoundError:  # removed by another sweep meanwhile
            continue
        except OSError as e:
            raise CheckpointError(f"cannot remove {path}, left by process {m.group(1)} (no longer "
                                  f"running): {e.strerror or e}") from None
        removed.append(path)
    return removed


def _raise_unless_missing(func, path, exc_info) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def make_dir(kind: str, directory: Optional[str] = None, stem: str = "") -> str:
    """A new directory ``<stem><kind><owner>-<random>`` in ``directory`` (default: the system temp
    dir), after sweeping the dead owners' ones of this kind there (tempfile.mkdtemp: mode 0700)."""
    sweep(directory, kind)
    return tempfile.mkdtemp(prefix=f"{stem}{kind}{owner_tag()}-", dir=directory)


def make_file(kind: str, directory: Optional[str] = None, stem: str = "") -> Tuple[int, str]:
    """(fd, path) of a new file named like :func:`make_dir`'s (tempfile.mkstemp: mode 0600)."""
    sweep(directory, kind)
    return tempfile.mkstemp(prefix=f"{stem}{kind}{owner_tag()}-", dir=directory)
