"""torch.distributed + Megatron parallel-state setup shared by every Megatron job.

Rank and world size come from the environment the launcher sets (torchrun: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain ``python`` run is a world of one. NCCL on GPUs,
gloo on the CPU (where nemo_minitron.compat.cpu makes Megatron's CUDA calls land on the CPU).
"""
from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head.strip()
    prefix, rest = head.split("[", 1)
    first = rest.split("]", 1)[0].split(",")[0].split("-")[0]
    return prefix + first


def env_from_slurm(environ=None) -> dict:
    """torchrun-style variables from an ``srun`` task's SLURM_* ones (one task per GPU, no
    torchrun under srun); empty when RANK is already set or this is not a SLURM task."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
           "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in environ and environ.get("SLURM_NODELIST"):
        env["MASTER_ADDR"] = first_slurm_host(environ["SLURM_NODELIST"])
    if "MASTER_PORT" not in environ and environ.get("SLURM_JOB_ID", "").isdigit():
        env["MASTER_PORT"] = str(20000 + int(environ["SLURM_JOB_ID"]) % 20000)
    return env


def is_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def init_megatron(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str = None) -> None:
    """Initialize the process group (if needed) and Megatron's TP/PP groups and RNG tracker."""
    import torch.distributed as dist

    if not torch.cuda.is_available():
        from nemo_minitron.compat import cpu

        cpu.activate()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        os.environ.update(env_from_slurm())
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
