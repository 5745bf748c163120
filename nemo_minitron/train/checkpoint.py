"""Resumable training checkpoints: Megatron ``dist_checkpointing`` (torch_dist) for model and
optimizer, plus the trainer state (step, scheduler, config) in the common state and each rank's RNG
state as a per-rank object.

Layout under ``ckpt_dir``::

    step_000010/          a complete checkpoint (dist_checkpointing directory)
    step_000020/
    latest                text: the directory name of the newest complete checkpoint
    run.json              what the run was started from (nemo_minitron/train/resume.py)

A save writes ``.step_000020.tmp`` first; only when every rank has finished does rank 0 rename it to
``step_000020`` and then replace ``latest`` (write + ``os.replace``). An interrupted save leaves at
most a ``.tmp`` directory, which is never read and is removed by the next save; the last good
checkpoint and ``latest`` are untouched.

The model part is stored under Megatron's names with stacked layers, so it reloads at another TP/PP
(Megatron's resharding); Megatron's optimizer state too. The RNG states and the plain-torch fallback
optimizer are per rank: resuming those needs the same layout.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from nemo_minitron.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def per_rank_object(key: str, data):
    """A ShardedObject with one shard per (pp, tp, dp) rank: each rank gets its own back."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject(key, data, shape, offset, replica_id=0)


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def latest_checkpoint(ckpt_dir: Optional[str]) -> Optional[str]:
    """Path of the newest complete checkpoint, or None. ``latest`` names it; without that file (a
    crash between rename and pointer update) the highest complete ``step_*`` directory counts."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return None
    pointer = os.path.join(ckpt_dir, LATEST)
    candidates = sorted((int(m.group(1)), d) for d in os.listdir(ckpt_dir)
                        if (m := _STEP_DIR.match(d)) and os.path.isdir(os.path.join(ckpt_dir, d)))
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if not _STEP_DIR.match(name) or not os.path.isdir(os.path.join(ckpt_dir, name)):
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory")
        # a newer complete step dir than the pointer exists only if the pointer update was lost
        if candidates and candidates[-1][0] > int(_STEP_DIR.match(name).group(1)):
            name = candidates[-1][1]
        return os.path.join(ckpt_dir, name)
    return os.path.join(ckpt_dir, candidates[-1][1]) if candidates else None


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _model_sharded_state(model) -> dict:
    """The model part: every parameter, or for a LoRA run only the adapters (the frozen base is
    the base model, read again on resume; the optimizer holds state for the adapters only)."""
    from nemo_minitron.peft import lora

    return lora.sharded_state_dict(model) if lora.has_lora(model) else model.sharded_state_dict()


_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state(model, optimizer, trainer_state: dict, is_loading: bool):
    model_sd = _model_sharded_state(model)
    state = {"model": model_sd, "trainer": trainer_state, "rng": per_rank_object("rng_state",
                                                                               rng_state())}
    try:
        # megatron-core >= 0.14 dropped the default distributed-optimizer format (its flattened
        # ranges no longer validate). "dp_reshardable" (Megatron-LM's default) saves each rank's
        # buffer shards as they are, torch Adam's "step" included ("fully_reshardable" drops it on
        # load without Apex/TE fused Adam); it resumes at the same TP/PP, any DP.
        # Other optimizers ignore the metadata.
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=_OPTIM_METADATA)
    except TypeError:  # older signatures: no metadata (0.7 / 0.8), no is_loading
        try:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
        except TypeError:
            state["optimizer"] = optimizer.sharded_state_dict(model_sd)
    return state


def save_checkpoint(ckpt_dir: str, step: int, model, optimizer, trainer_state: dict,
                    keep_last: int = 2, identity: Optional[dict] = None) -> str:
    """Collective: every rank calls it. ``model``: the unwrapped GPTModel (this rank's part).
    ``identity``: what the run was started from (nemo_minitron.train.resume), written to
    ``run.json`` before ``latest`` points at the new step. Step directories newer than ``step``
    belong to an earlier run this one replaces (``trainer.resume=false``): they are removed once
    the new step is in place, before ``run.json`` names the new run."""
    from megatron.core import dist_checkpointing

    final = os.path.join(ckpt_dir, step_dir_name(step))
    tmp = os.path.join(ckpt_dir, "." + step_dir_name(step) + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for d in os.listdir(ckpt_dir):  # leftovers of interrupted saves
            if d.startswith(".step_") and d.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, trainer_state, False), tmp)
    _barrier()
    if rank0:
        if os.path.exists(final):  # re-saving a step (e.g. after resume): replace it last
            shutil.rmtree(final)
        os.rename(tmp, final)
        for d in os.listdir(ckpt_dir):  # an earlier run's later steps (this one did not resume)
            m = _STEP_DIR.match(d)
            if m and int(m.group(1)) > step:
                shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
        if identity is not None:
            from nemo_minitron.train.resume import write_identity

            write_identity(ckpt_dir, identity)
        pointer_tmp = os.path.join(ckpt_dir, "." + LATEST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(step_dir_name(step) + "\n")
        os.replace(pointer_tmp, os.path.join(ckpt_dir, LATEST))
        steps = sorted(int(m.group(1)) for d in os.listdir(ckpt_dir) if (m := _STEP_DIR.match(d)))
        for old in steps[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, step_dir_name(old)), ignore_errors=True)
    _barrier()
    return final


def _torch_adams(optimizer):
    """The torch Adam/AdamW optimizers inside a Megatron (possibly chained) optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def _init_empty_adam_state(optimizer) -> None:
    """Give a fresh Megatron optimizer's torch Adam the state entries a checkpoint fills in.

    Without Apex/TE fused Adam, megatron-core's DistributedOptimizer reads the step count from the
    torch optimizer's per-parameter state, which is empty until the first step, so building the
    loading template fails (``assert len(steps) == 1``). Zeros are placeholders: the load replaces
    every one of them."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)


def _restore_adam_steps(optimizer) -> None:
    """Without Apex/TE, megatron-core's DistributedOptimizer keeps torch Adam's step count in its
    param groups' ``step`` when saving, but on loading gives every parameter state one shared
    ``step`` tensor, which the per-bucket copy then overwrites with the placeholder; torch's
    foreach Adam would also add 1 to a shared tensor once per parameter. Each parameter gets its
    own step again, from the param group it belongs to (restored from the checkpoint)."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in inner.state.get(p, {}):
                    inner.state[p]["step"] = torch.tensor(float(group["step"]))


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Collective. Restore model, optimizer and this rank's RNG state; return the trainer state."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    from nemo_minitron.convert.dist_ckpt import check_torch_dist

    check_torch_dist(path)  # the pickles Megatron's load would read without limits, read safely
    _init_empty_adam_state(optimizer)
    template = _sharded_state(model, optimizer, {}, True)
    loaded = dist_checkpointing.load(template, path)
    from nemo_minitron.peft import lora

    if lora.has_lora(model):
        lora.load_sharded_state_dict(model, loaded["model"])
    else:
        model.load_state_dict(loaded["model"])
    with torch.no_grad():  # the dp_reshardable loader copies into main params in place
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    set_rng_state(loaded["rng"])
    return loaded["trainer"]
