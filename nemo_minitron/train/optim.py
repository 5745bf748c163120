"""Megatron DDP, the optimizer and the learning-rate schedule.

``build_optimizer`` returns Megatron's own optimizer (``get_megatron_optimizer``: fp32 master weights
for bf16 params, grad clipping by the global norm over TP/PP ranks, optional distributed optimizer)
wherever it imports. megatron-core 0.7.0 (NeMo 24.05) imports NVIDIA apex unconditionally in
``megatron.core.optimizer``, so there -- on a machine without apex -- :class:`TorchOptimizer` drives a
plain ``torch.optim.AdamW`` over Megatron DDP's grad buffers with the same parameter groups, the
same global grad norm and the same clipping; it supports fp32 only (no master weights).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from nemo_minitron.errors import ConfigError


def megatron_optimizer_available() -> Tuple[bool, str]:
    """(usable, reason if not) for ``megatron.core.optimizer.get_megatron_optimizer``."""
    try:
        from megatron.core.optimizer import get_megatron_optimizer  # noqa: F401
    except ImportError as e:
        return False, f"megatron.core.optimizer does not import here ({e})"
    return True, ""


def wrap_ddp(model, use_distributed_optimizer: bool = False, grad_reduce_in_fp32: bool = True):
    """Megatron's DistributedDataParallel (grads accumulate in ``param.main_grad`` buffers and are
    averaged over the data-parallel group by ``finish_grad_sync``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from nemo_minitron.compat import mcore

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=grad_reduce_in_fp32,
                                               overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer)
    kwargs = {}
    if mcore.mcore_version() < (0, 8, 0):  # 0.7.0 requires the group explicitly
        kwargs["data_parallel_group"] = ps.get_data_parallel_group()
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   **kwargs)


def _no_weight_decay(name: str, param) -> bool:
    """Megatron's default: no decay for biases and 1-D parameters (the RMSNorm weights)."""
    return name.endswith(".bias") or param.dim() == 1


class TorchOptimizer:
    """``torch.optim.AdamW`` over Megatron DDP's fp32 grad buffers, with Megatron's semantics:
    parameter groups with/without weight decay, global grad norm over the model-parallel group
    (TP duplicates counted once), clipping by that norm."""

    def __init__(self, ddp_model, optim_cfg):
        named = [(n, p) for n, p in ddp_model.module.named_parameters() if p.requires_grad]
        for n, p in named:
            if p.dtype != torch.float32:
                raise ConfigError("the plain-torch optimizer fallback (megatron-core without its "
                                  f"optimizer) needs fp32 parameters; {n} is {p.dtype}: set "
                                  "trainer.precision=fp32")
        groups = [
            {"params": [p for n, p in named if not _no_weight_decay(n, p)],
             "weight_decay": optim_cfg.weight_decay},
            {"params": [p for n, p in named if _no_weight_decay(n, p)], "weight_decay": 0.0},
        ]
        self.params = [p for _, p in named]
        self.clip_grad = optim_cfg.clip_grad
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=optim_cfg.lr,
                                           betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def grad_norm(self) -> float:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        # on the parameters' device: NCCL reduces only GPU tensors
        sq = torch.zeros((), dtype=torch.float32,
                         device=self.params[0].device if self.params else None)
        for p in self.params:
            if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
                sq += p.grad.float().pow(2).sum()
        torch.distributed.all_reduce(sq, group=ps.get_model_parallel_group())
        return float(sq.sqrt())

    def step(self):
        for p in self.params:  # DDP accumulated (and DP-averaged) the grads in main_grad
            p.grad = p.main_grad
        norm = self.grad_norm()
        if self.clip_grad and self.clip_grad > 0:
            coeff = self.clip_grad / (norm + 1e-6)
            if coeff < 1.0:
                for p in self.params:
                    p.grad.mul_(coeff)
        self.optimizer.step()
        return True, norm, None

    # checkpointing: per (pp, tp) rank, identical across DP replicas (not reshardable)
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False):
        from nemo_minitron.train.checkpoint import per_rank_object

        return {"torch_optimizer": per_rank_object("optimizer.torch_adamw",
                                                   self.optimizer.state_dict())}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["torch_optimizer"])


def check_optim(optim_cfg) -> None:
    """The ``optim`` section's values, before any model is built (torch and Megatron would reject
    some only when the optimizer is made, with a traceback)."""
    o = optim_cfg
    if o.name != "adam":
        raise ConfigError(f"optim.name={o.name!r}: only 'adam' is supported")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    if not o.weight_decay >= 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                    and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1)")
    if not o.eps > 0:
        raise ConfigError(f"optim.eps={o.eps} must be positive")
    if not o.clip_grad >= 0:
        raise ConfigError(f"optim.clip_grad={o.clip_grad} must be >= 0 (0: off)")
    for key in ("warmup_steps", "decay_steps"):
        if getattr(o, key) < 0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be >= 0")


def build_optimizer(ddp_model, optim_cfg, precision: str):
    """Megatron's optimizer where it imports (see module docstring), else :class:`TorchOptimizer`."""
    if optim_cfg.name != "adam":
        raise ConfigError(f"optim.name={optim_cfg.name!r}: only 'adam' is supported")
    ok, _ = megatron_optimizer_available()
    if not ok:
        if optim_cfg.use_distributed_optimizer:
            raise ConfigError("optim.use_distributed_optimizer needs megatron.core.optimizer, "
                              "which does not import on this megatron-core (needs apex)")
        return TorchOptimizer(ddp_model, optim_cfg)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    bf16 = precision == "bf16"
    config = OptimizerConfig(optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr,
                             weight_decay=optim_cfg.weight_decay, adam_beta1=optim_cfg.betas[0],
                             adam_beta2=optim_cfg.betas[1], adam_eps=optim_cfg.eps,
                             bf16=bf16, fp16=False,
                             params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
                             clip_grad=optim_cfg.clip_grad)
    return get_megatron_optimizer(config, [ddp_model])


class CosineWarmup:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` over
    ``decay_steps``, then constant ``min_lr``. A pure function of the step, so resuming needs only
    the step number (the config is stored with the checkpoint for the record)."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, decay_steps: int):
        if lr < min_lr:
            raise ConfigError(f"optim.lr={lr} is below optim.min_lr={min_lr}")
        self.lr, self.min_lr = lr, min_lr
        self.warmup_steps, self.decay_steps = max(0, warmup_steps), max(1, decay_steps)

    def __call__(self, step: int) -> float:
        """Learning rate of (0-based) optimizer step ``step``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def apply(self, optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return dict(lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                    decay_steps=self.decay_steps)


def build_scheduler(optim_cfg, max_steps: int) -> CosineWarmup:
    decay = optim_cfg.decay_steps or max(1, max_steps - optim_cfg.warmup_steps)
    return CosineWarmup(optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_steps, decay)


def trainable_param_names(model) -> List[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
