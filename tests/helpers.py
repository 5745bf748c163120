"""Multi-rank checks as forked workers of the already-imported test process (~1 s each instead of
~16 s for a torchrun subprocess that re-imports torch and megatron)."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback


def _worker(fn, rank, world_size, port, tp, pp, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
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
    # Leave without tearing down the process group: torch 2.3's gloo destroy_process_group can
    # hang after collectives; the worker is finished and the OS frees everything.
    queue.close()
    queue.join_thread()
    os._exit(0)


def run_ranks(fn, world_size: int = 1, tp: int = 1, pp: int = 1, args=(), timeout: float = 120):
    """Run ``fn(rank, *args)`` on ``world_size`` forked ranks with Megatron initialized at TP/PP;
    return the results ordered by rank, or raise with the failing ranks' tracebacks."""
    from nemo_minitron.dist import free_port

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, tp, pp, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            rank, status, payload = queue.get(timeout=timeout)
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
