"""A job and every process it started die together, however the job ends (``kill -9`` included).

Nothing runs in a process killed with SIGKILL, so the children cannot be cleaned up by their parent;
each child must notice the death itself. Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the
kernel kill a process when its parent dies: no thread, no polling, and it holds across ``exec``.
Its caveat: "parent" is the *thread* that forked, so a process forked from a thread that ends
before the process would be killed early. Children forked from the main thread (every fork in this
package, Megatron's writers and its result-queue manager) get the signal; a child forked from any
other thread gets a watchdog thread instead that polls ``getppid()`` (at most
``WATCHDOG_PERIOD_S`` late).

* Forks: :func:`tie_children` registers an ``os.register_at_fork`` handler, so every process this
  one forks afterwards -- ours, multiprocessing's (Pool, fork Manager) and Megatron's writer
  processes -- is tied to it, and so are their own children (the registration is inherited).
* Spawned / exec'd processes run no at-fork handler. :func:`start_manager` starts a
  multiprocessing manager (Megatron's write-results queue) whose server ties itself through the
  manager's ``initializer``; a process started with :func:`child_env` (the converter a job runs
  for its ``.nemo`` export) ties itself with :func:`die_with_launcher` when it starts.

Nothing here kills a process group: a job may be one rank of ``torchrun``/``srun``, whose group is
the launcher's. A process is only ever tied to its own parent, never to a foreign one: a
``nohup``'d job keeps running after its shell exits.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from nemo_minitron.errors import MinitronError

# Set by a job in the environment of a process it starts (child_env): the job's pid.
LAUNCHER_ENV = "NEMO_MINITRON_LAUNCHER_PID"
WATCHDOG_PERIOD_S = 0.25
_PR_SET_PDEATHSIG = 1
_state = {"tied": False}
_fork = threading.local()  # the forking thread's own record survives into the child
_LIBC = None


def libc():
    """glibc through ctypes (errno kept), loaded once; None where there is none."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


def _prctl_pdeathsig() -> bool:
    """Ask the kernel for SIGKILL when the parent (thread) dies; False off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return False
    lib = libc()
    return lib is not None and lib.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0


def _watchdog(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_PERIOD_S)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent: int, forked_from_main_thread: bool = True) -> None:
    """In a child: die (SIGKILL) when ``parent`` does; if it already has, die now. Usable as a
    multiprocessing ``initializer`` (the arguments are plain data)."""
    if not (forked_from_main_thread and _prctl_pdeathsig()):
        threading.Thread(target=_watchdog, args=(parent,), daemon=True,
                         name="nemo-minitron-parent-watchdog").start()
    if os.getppid() != parent:  # the parent died before the signal was armed: nobody waits
        os.kill(os.getpid(), signal.SIGKILL)


def _before_fork() -> None:
    _fork.parent = os.getpid()
    _fork.from_main = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    die_with_parent(_fork.parent, _fork.from_main)


def tie_children() -> None:
    """From now on, every process this one forks dies when this one dies (idempotent; inherited by
    forked children, so grandchildren die with their parent in turn)."""
    if _state["tied"] or not hasattr(os, "register_at_fork"):
        return
    libc()  # loaded here, not in a forked child (dlopen after fork can deadlock)
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _state["tied"] = True


def child_env(env: dict) -> dict:
    """``env`` for a process this one starts (subprocess) that must die with it: it calls
    :func:`die_with_launcher` when it starts."""
    return {**env, LAUNCHER_ENV: str(os.getpid())}


def die_with_launcher() -> None:
    """In a process started with :func:`child_env`: die with the process that started it, and tie
    this process's own children to it. No-op for a process started any other way (a user's shell,
    torchrun, srun). Raises if the launcher is already gone (its output would appear after the job
    that asked for it ended)."""
    value = os.environ.pop(LAUNCHER_ENV, None)  # not passed on to this process's own children
    if value is None:
        return
    launcher = int(value)
    if os.getppid() != launcher:  # reparented: the launcher died while this process started
        raise MinitronError(f"the job that started this process (pid {launcher}) has exited; "
                            "not writing its output")
    tie_children()
    # the launcher waits for this process in the thread that started it (subprocess.run), so
    # that thread outlives it: the signal is safe whichever thread it was
    die_with_parent(launcher)


def start_manager(ctx):
    """A started ``multiprocessing`` SyncManager of context ``ctx`` (fork or spawn) whose server
    process dies with this one. Its proxies keep it alive; multiprocessing shuts it down at a
    normal exit."""
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=ctx)
    manager.start(initializer=die_with_parent,
                  initargs=(os.getpid(), threading.current_thread() is threading.main_thread()))
    return manager


def tie_megatron_writer_queue(method: str) -> None:
    """Megatron-Core (0.8+) collects ``dist_checkpointing`` write results through a multiprocessing
    manager it starts at the first save and never stops: a process that outlives a killed job
    (measured: one per kill, waiting in futex, holding the job's open files such as metrics.csv).
    Its factory is replaced by one that starts the same manager, with start method ``method``
    (Megatron's own is spawn; the CPU shim uses fork), through :func:`start_manager`. No-op where
    Megatron has no such manager (0.7)."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    name = writer_queue_factory_name(fa)
    if name is None:
        return

    owner = {}

    def _get_write_results_queue(*_args, **_kwargs):  # 0.19: (mp_mode='spawn'), ignored
        # a queue inherited through fork is the parent's: ranks forked from one process would
        # share it and read each other's write results (measured: "Incomplete worker results")
        if fa._results_queue is None or owner.get("pid") != os.getpid():
            fa._results_queue = start_manager(multiprocessing.get_context(method)).Queue()
            owner["pid"] = os.getpid()
        return fa._results_queue

    _get_write_results_queue.start_method = method
    setattr(fa, name, _get_write_results_queue)


def writer_queue_factory_name(fa):
    """The name of ``filesystem_async``'s results-queue factory (the module ``fa``) or None:
    ``_get_write_results_queue`` (megatron-core 0.8 - 0.16), ``get_write_results_queue``
    (0.19: ``(mp_mode='spawn')``)."""
    return next((n for n in ("_get_write_results_queue", "get_write_results_queue")
                 if callable(getattr(fa, n, None))), None)


def drop_megatron_writer_queue() -> None:
    """Forget Megatron's write-results queue (its manager stops when the proxy is freed): for a
    tool that saved in a world of its own (``dist.one_rank_world``), so a job this process runs
    or forks later starts its own."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", None) is not None:
        fa._results_queue = None


def tie_megatron_job(manager_start: str = "spawn") -> None:
    """Everything a Megatron job starts dies with it: forked children, and Megatron's result-queue
    manager (started with ``manager_start``: spawned on a GPU machine, forked under the CPU shim,
    which the caller knows)."""
    tie_children()
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # no async filesystem writer in this megatron-core: no manager either
        return
    name = writer_queue_factory_name(fa)
    current = getattr(fa, name, None) if name is not None else None
    if current is not None and getattr(current, "start_method", None) is None:
        tie_megatron_writer_queue(manager_start)
