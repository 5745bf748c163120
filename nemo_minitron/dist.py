"""torch.distributed + Megatron parallel-state setup shared by every Megatron job.

The same command runs as plain ``python`` (a world of one), under ``torchrun``, and under ``srun``
with one task per GPU and no torchrun (NeMo's convention). Rank, world size and the rendezvous
address come from Lightning's cluster environments -- the same SLURM / torchelastic logic NeMo
relies on -- not from a parser of our own: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS /
SLURM_NODELIST under srun, RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR under torchrun. torchrun is
checked first, so torchrun inside an sbatch allocation (where SLURM_NTASKS is also set) works.
NCCL on GPUs, gloo on the CPU (where nemo_minitron.compat.cpu makes Megatron's CUDA calls land on
the CPU).
"""
from __future__ import annotations

import contextlib
import os
import socket

import torch

from nemo_minitron.errors import MinitronError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_environment():
    """Lightning's ClusterEnvironment describing how this process was launched."""
    try:
        from lightning_fabric.plugins.environments import (LightningEnvironment, SLURMEnvironment,
                                                           TorchElasticEnvironment)
    except ImportError:
        raise MinitronError("launching needs Lightning's cluster environments: pip install "
                            "lightning-fabric (pytorch-lightning >= 2.0 ships it too)") from None
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect():
        return SLURMEnvironment(auto_requeue=False)
    return LightningEnvironment()


# set by torchrun (torchelastic) or by SLURM; with none of them, the process is a world of one
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                  "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID")


# True once this process, launched alone, has exported its own world-of-one rendezvous: the RANK /
# WORLD_SIZE it set then are not a launcher's (a second job in the same process, e.g. the demo's
# perplexity of two models, is still alone)
_own_rendezvous = False


def launched_alone() -> bool:
    """Plain ``python``: no launcher variable set (or only those this process set itself), so
    Lightning's answer is known without importing it (LightningEnvironment: rank 0 of 1; importing
    lightning_fabric costs ~1 s; it is an optional dependency, the ``launch`` extra)."""
    return _own_rendezvous or not any(v in os.environ for v in _LAUNCHER_VARS)


def launched_world_size() -> int:
    """The number of ranks of this launch, also before the process group exists (a recipe checks
    its TP x PP layout first): 1 under python, WORLD_SIZE under torchrun, SLURM_NTASKS under srun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1 if launched_alone() else cluster_environment().world_size()


def _export_rendezvous() -> None:
    """Put rank, world size and rendezvous address in the variables torch.distributed reads."""
    global _own_rendezvous
    if launched_alone():  # what LightningEnvironment gives a plain process
        _own_rendezvous = True
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        return
    env = cluster_environment()
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)  # single process: a free port
    os.environ["RANK"] = str(env.global_rank())
    os.environ["LOCAL_RANK"] = str(env.local_rank())
    os.environ["WORLD_SIZE"] = str(env.world_size())


def is_rank0() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs)


def compute_device() -> torch.device:
    """Where this rank computes: the GPU ``init_megatron`` selected (NCCL moves only GPU tensors),
    else the CPU (gloo)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def lazy_torch_compile():
    """While Megatron-Core is first imported, ``torch.compile`` defers its own work to the first
    call of what it decorates. Megatron decorates its fused kernels with ``jit_fuser =
    torch.compile`` at import time, and ``torch.compile`` imports TorchDynamo and Inductor at
    once: 2.2 of the 5.6 s of importing megatron.core on the CPU, for kernels that inference on
    the CPU never calls. Megatron binds ``jit_fuser`` once (megatron/core/jit.py, 0.7 and 0.16),
    so modules imported later keep the deferred form; a call compiles exactly as before."""
    import functools
    import sys

    if "megatron.core.jit" in sys.modules:
        yield
        return
    real = torch.compile

    def deferred(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: deferred(fn, **kwargs)
        compiled = []

        @functools.wraps(model)
        def call(*args, **kw):
            if not compiled:
                compiled.append(real(model, **kwargs))
            return compiled[0](*args, **kw)
        return call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real


def init_megatron(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str = None,
                  rendezvous: bool = True) -> None:
    """Initialize the process group (if needed) and Megatron's TP/PP groups and RNG tracker.
    ``rendezvous=False``: the caller has set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT itself
    (no launcher to ask, and no Lightning import: 0.6 s)."""
    import torch.distributed as dist

    from nemo_minitron import lifecycle
    from nemo_minitron.compat import cpu

    with lazy_torch_compile():
        if not torch.cuda.is_available():
            cpu.activate()
        from megatron.core import parallel_state, tensor_parallel
    # whatever this job starts dies with it, kill -9 included
    lifecycle.tie_megatron_job("fork" if cpu.is_active() else "spawn")

    if not dist.is_initialized():
        free_retired_groups()
        if rendezvous:
            _export_rendezvous()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# Process groups this process has destroyed but not yet freed, by the pid that made them: see
# destroy_process_groups. A forked child inherits its parent's and never frees them.
_retired_groups: list = []


def destroy_process_groups() -> None:
    """``dist.destroy_process_group()``, with the groups' C++ destructors run later, at the next
    set-up or at exit. torch before pytorch#154976 (2025; the NeMo 24.05 container's 2.3
    included) runs a gloo group's destructor with the GIL held, and it joins the group's worker
    threads; a worker that has just finished a collective may still need the GIL to free that
    collective's tensors, so the two wait for each other forever (pytorch#56297). Seen in CI at a
    distillation job's end; tests/test_launch.py reproduces it on torch 2.3 every time. Holding
    the group objects until later gives the workers that moment."""
    import atexit

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if not dist.is_initialized():
        return
    world = getattr(distributed_c10d, "_world", None)  # every group, Megatron's included
    groups = list(getattr(world, "pg_map", None) or [dist.group.WORLD])
    if not _retired_groups:
        atexit.register(free_retired_groups)
    _retired_groups.append((os.getpid(), groups))
    dist.destroy_process_group()


def free_retired_groups() -> None:
    """Free the groups :func:`destroy_process_groups` kept (their threads have long finished).
    Groups made by another process (the parent of a fork) stay: their destructor would join
    threads this process does not have."""
    pid = os.getpid()
    _retired_groups[:] = [entry for entry in _retired_groups if entry[0] != pid]


def destroy_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    destroy_process_groups()


@contextlib.contextmanager
def one_rank_world(megatron: bool = False, seed: int = 1234):
    """torch.distributed as a world of one, in this process, for a tool that runs Megatron code
    alone (a converter's ``dist_checkpointing.save``, verify's model): a gloo group over a
    ``FileStore`` in a temporary directory (no port to pick, nothing forked), destroyed on exit.
    Where CUDA is absent, Megatron's CPU shim is active for the block (``compat/cpu.py``).
    ``megatron=True`` also sets up Megatron's parallel state at TP=PP=1 for a model (NCCL where
    CUDA is, as :func:`init_megatron`). A process that already has a group of one (a single-rank
    job) keeps it; a group of several ranks is an error: a one-rank collective inside it would
    hang."""
    import gc
    import tempfile

    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if not own_group and dist.get_world_size() != 1:
        raise MinitronError(
            f"this step runs as a world of one, but this process is rank {dist.get_rank()} of a "
            f"{dist.get_world_size()}-rank process group; run it outside the job (e.g. "
            "`nemo-minitron convert hf-to-nemo` in a plain process)")
    with contextlib.ExitStack() as stack:
        if own_group:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="nemo-minitron-world-"))
            # after the group is destroyed, free what still refers to it (reference cycles in
            # the checkpoint code) here: freed later in a forked child, the group's destructor
            # joins threads the child does not have and aborts it (measured on torch 2.3)
            stack.callback(gc.collect)
            free_retired_groups()
            backend = "nccl" if megatron and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, store=dist.FileStore(os.path.join(tmp, "store"), 1),
                                    rank=0, world_size=1)
            stack.callback(destroy_process_groups)
        from nemo_minitron import lifecycle
        from nemo_minitron.compat import cpu

        if not torch.cuda.is_available():
            # Megatron's CUDA calls (e.g. its checkpoint writer's torch.cuda.synchronize) land
            # on the CPU, for the block (a shim that was already active stays)
            with lazy_torch_compile() if megatron else contextlib.nullcontext():
                stack.enter_context(cpu.active())
        # Megatron's checkpoint writers and result-queue manager die with this process (kill -9
        # included); the queue is this world's: a process forked later makes its own
        lifecycle.tie_megatron_job("fork" if cpu.is_active() else "spawn")
        stack.callback(lifecycle.drop_megatron_writer_queue)
        if megatron:
            with lazy_torch_compile():
                from megatron.core import parallel_state, tensor_parallel
            if not parallel_state.model_parallel_is_initialized():
                parallel_state.initialize_model_parallel(1, 1)
                stack.callback(_forget_groups, parallel_state)
                stack.callback(parallel_state.destroy_model_parallel)
                tensor_parallel.model_parallel_cuda_manual_seed(seed)
        yield


def _forget_groups(parallel_state) -> None:
    """After ``destroy_model_parallel``: drop the process groups it leaves behind (megatron-core
    0.16.1 keeps ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP``), so they are freed in this process.
    Freed later in a forked child (the next job's rank), a gloo group's destructor waits for
    threads the child does not have: the rank hangs (measured)."""
    import torch.distributed as dist

    for name, value in list(vars(parallel_state).items()):
        if name.isupper() and isinstance(value, dist.ProcessGroup):
            setattr(parallel_state, name, None)
