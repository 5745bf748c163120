"""Multi-rank checks as forked workers of the already-imported test process (~1 s each instead of
~16 s for a torchrun subprocess that re-imports torch and megatron)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import pickle
import sys
import time
import traceback


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NODELIST", "SLURM_JOB_NAME", "SLURM_JOB_ID",
                 "SLURM_NTASKS_PER_NODE")


def launcher_env(launcher: str, rank: int, world_size: int, port: int) -> dict:
    """The variables torchrun, or srun with one task per rank on one node, sets for ``rank``."""
    if launcher == "torchrun":
        return dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                    LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", TORCHELASTIC_RUN_ID="test",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if launcher == "srun":
        return dict(SLURM_NTASKS=str(world_size), SLURM_NTASKS_PER_NODE=str(world_size),
                    SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                    SLURM_NODEID="0", SLURM_NODELIST="127.0.0.1", SLURM_JOB_NAME="nemo-minitron-test",
                    SLURM_JOB_ID="4242", MASTER_PORT=str(port))
    raise ValueError(launcher)


def _worker(fn, rank, world_size, port, tp, pp, args, queue, launcher, timeout):
    import faulthandler

    # a rank that hangs prints every thread's stack before the parent gives up on it
    faulthandler.dump_traceback_later(max(timeout - 5, 1), exit=False, file=sys.__stderr__)
    for var in LAUNCHER_VARS:
        os.environ.pop(var, None)
    os.environ.update(launcher_env(launcher, rank, world_size, port))
    try:
        import torch

        # The parent may have used OpenMP threads before fork(); the child's copy of the thread
        # pool is unusable (parallel regions hang), so the workers compute single-threaded.
        torch.set_num_threads(1)
        from nemo_minitron.dist import init_megatron

        init_megatron(tp=tp, pp=pp)
        result = fn(rank, *args)
        # Plain pickle: tensors travel by value (multiprocessing's own pickler would share them
        # through file descriptors that die with this process).
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    # Leave without tearing down the process group (the worker is finished and the OS frees
    # everything; a job's own teardown is nemo_minitron.dist.destroy_process_groups). multiprocessing's
    # own finalizers still run, so helpers the worker started (dist_checkpointing's results-queue
    # manager) shut down instead of outliving the test and holding its stdout open.
    queue.close()
    queue.join_thread()
    multiprocessing.util._exit_function()
    os._exit(0)


def run_ranks(fn, world_size: int = 1, tp: int = 1, pp: int = 1, args=(), timeout: float = 120,
              launcher: str = "torchrun"):
    """Run ``fn(rank, *args)`` on ``world_size`` forked ranks with Megatron initialized at TP/PP
    from the environment ``launcher`` ("torchrun" or "srun") would set; return the results ordered
    by rank, or raise with the failing ranks' tracebacks."""
    from nemo_minitron.dist import free_port

    import faulthandler
    import signal

    # inherited through fork: a rank stuck before _worker runs (e.g. in an at-fork handler) still
    # prints its stacks when the parent signals it on timeout
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, tp, pp, args, queue,
                                                        launcher, timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Exception:  # queue.Empty: a rank hangs; its stacks go to the captured stderr
                for p in procs:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(2)
                raise
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed check failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
