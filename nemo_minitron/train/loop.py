"""The one training loop: Megatron-Core TP/PP/DP through ``get_forward_backward_func``.

What plugs in (the distillation recipe reuses this loop through these, not a second loop):

* ``forward_step(model, batch) -> output``: runs the model chunk on a micro batch. On the last
  pipeline stage its output reaches ``loss_fn``; elsewhere it is the hidden state Megatron sends on.
  Default: per-token vocab-parallel cross entropy ``[b, s]``, logits on counted tokens only.
  A distillation step would run a frozen teacher here too and return both logits.
* ``loss_fn(output, batch) -> (loss_sum, num_tokens)``: a *sum* over the micro batch's counted
  tokens and their number. The loop turns sums into the mean over the whole global batch, so the
  loss and the gradients are the same for any micro batch size, TP, PP and DP.
* ``callbacks``: ``cb(trainer, step, metrics)`` after every optimizer step.
* ``metric_names``: extra per-token metrics; ``loss_fn`` then returns a third element, a dict of
  their sums over the same tokens (e.g. distillation's ``kl`` and ``lm``). They are reduced like the
  loss and logged as means (train and validation). The names are fixed up front so every pipeline
  stage agrees on the size of the reduced vector.
* ``pipeline_io``: for hooks that pass more than the model's hidden state between pipeline stages
  (distillation sends the teacher's next to the student's). An object with ``wrap(model)`` -> what
  the schedule drives instead of the DDP model (its ``set_input_tensor`` receives the activation
  from the previous stage; ``forward_step`` gets it as ``model``), and
  ``adjust_tensor_shapes(recv_shapes, send_shapes)`` -> the shapes of what stages exchange, given
  Megatron's ``[(s, b, hidden)]``. Used only at PP > 1 (for validation too); the DDP model stays
  what is optimized and checkpointed.

Loss normalization. Megatron's schedule divides each micro batch's loss by the number of micro
batches and DDP averages gradients over the ``dp`` replicas; the loop pre-multiplies by
``num_microbatches * dp / tokens_in_global_batch`` so that what is differentiated is exactly
``sum(loss over all answer tokens of the global batch) / their count``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from nemo_minitron.train import checkpoint as ckpt


def default_forward_step(model, batch):
    """Per-token cross entropy ``[b, s]`` on the last stage (vocab-parallel: the logits are never
    gathered; computed only on the tokens ``loss_mask`` counts, zero elsewhere:
    :func:`nemo_minitron.model.forward.counted_lm_loss`); ``[s, b, hidden]`` activations on other
    pipeline stages."""
    from nemo_minitron.model.forward import counted_lm_loss

    return counted_lm_loss(model, batch)


def to_device(batch: dict, device: torch.device) -> dict:
    """A micro batch (built on the CPU by the data classes) on the model's device."""
    from nemo_minitron.data.packing import SegmentMask

    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v)
            else v.to(device) if isinstance(v, SegmentMask) else v for k, v in batch.items()}


def masked_lm_loss(output, batch):
    """Answer-only LM loss: (sum over loss_mask tokens, number of them)."""
    mask = batch["loss_mask"]
    return (output.float() * mask).sum(), mask.sum()


@dataclass
class LoopConfig:
    max_steps: int
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    log_every_n_steps: int = 1
    val_check_interval: int = 0
    limit_val_batches: int = 0
    ckpt_dir: Optional[str] = None
    ckpt_every_n_steps: int = 0
    keep_last_n_ckpts: int = 2
    resume: bool = True


def default_ckpt_dir(out: str) -> str:
    """Where a recipe keeps its training checkpoints unless ``trainer.ckpt_dir`` says: ``<out>.ckpt``."""
    return os.path.abspath(out).rstrip("/") + ".ckpt"


def recipe_loop(cfg, extra_columns: Sequence[str] = ()):
    """(LoopConfig, MetricsLogger) of a recipe config (its ``trainer``, ``model`` and ``data``
    sections and ``out``): checkpoints in ``trainer.ckpt_dir`` (default ``<out>.ckpt``), logs in
    ``trainer.log_dir`` (default ``<ckpt_dir>/logs``) written by rank 0 only; ``extra_columns``:
    the recipe's own metrics."""
    import torch.distributed as dist

    from nemo_minitron.train.logs import MetricsLogger

    t, m = cfg.trainer, cfg.model
    ckpt_dir = t.ckpt_dir or default_ckpt_dir(cfg.out)
    loop = LoopConfig(max_steps=t.max_steps, micro_batch_size=m.micro_batch_size,
                      global_batch_size=m.global_batch_size, seq_length=cfg.data.seq_length,
                      log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_check_interval,
                      limit_val_batches=t.limit_val_batches, ckpt_dir=ckpt_dir,
                      ckpt_every_n_steps=t.ckpt_every_n_steps, keep_last_n_ckpts=t.keep_last_n_ckpts,
                      resume=t.resume)
    logger = MetricsLogger(t.log_dir or os.path.join(ckpt_dir, "logs"), enabled=dist.get_rank() == 0,
                           total_steps=t.max_steps, progress_bar=t.progress_bar,
                           extra_columns=extra_columns)
    return loop, logger


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done == global batches consumed
    history: List[dict] = field(default_factory=list)  # per-step metrics (every rank)


def _reduce_for_log(sums: torch.Tensor) -> torch.Tensor:
    """[loss_sum, tokens] of this rank's micro batches -> global sums on every rank: all-reduce
    over DP (last stage), then broadcast from the last pipeline stage to the others."""
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage():
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(sums, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return sums


class Trainer:
    def __init__(self, ddp_model, optimizer, scheduler, train_data, loop: LoopConfig, *,
                 val_data=None, forward_step: Callable = default_forward_step,
                 loss_fn: Callable = masked_lm_loss, logger=None, callbacks: Sequence = (),
                 extra_state: Optional[dict] = None, metric_names: Sequence[str] = (),
                 pipeline_io=None, identity: Optional[dict] = None):
        from megatron.core import parallel_state as ps

        self.model, self.optimizer, self.scheduler = ddp_model, optimizer, scheduler
        self.train_data, self.val_data, self.loop = train_data, val_data, loop
        self.forward_step, self.loss_fn = forward_step, loss_fn
        self.logger, self.callbacks = logger, list(callbacks)
        self.extra_state = extra_state or {}  # e.g. the recipe config, saved for the record
        self.identity = identity  # what the run was started from: run.json (train/resume.py)
        self.state = TrainState()
        self.metric_names = tuple(metric_names)
        self.last_val_metrics: dict = {}
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.pipelined = ps.get_pipeline_model_parallel_world_size() > 1
        from nemo_minitron.dist import compute_device

        self.device = compute_device()  # batches and reduced sums live here
        self.schedule_model, self.schedule_kwargs = ddp_model, {}
        if pipeline_io is not None and ps.get_pipeline_model_parallel_world_size() > 1:
            from nemo_minitron.compat import mcore

            self.schedule_model = pipeline_io.wrap(ddp_model)
            self.schedule_kwargs = mcore.wide_pipeline_schedule_kwargs(
                ddp_model.config, pipeline_io.adjust_tensor_shapes)
        per_step = loop.micro_batch_size * self.dp
        if loop.global_batch_size % per_step:
            from nemo_minitron.errors import ConfigError

            raise ConfigError(f"global_batch_size={loop.global_batch_size} is not divisible by "
                              f"micro_batch_size * data_parallel_size = {loop.micro_batch_size} "
                              f"* {self.dp}")
        self.num_microbatches = loop.global_batch_size // per_step

    # ---- one schedule run --------------------------------------------------------------------
    def _run_schedule(self, micro_batches, scale: float, forward_only: bool) -> torch.Tensor:
        """Forward (and backward) over this rank's micro batches; returns [loss_sum, tokens,
        *metric sums] summed over them (zeros on non-last pipeline stages)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step_func(data_iterator, model):
            batch = to_device(next(data_iterator), self.device)
            output = self.forward_step(model, batch)

            def loss_func(out):
                loss_sum, tokens, *extra = self.loss_fn(out, batch)
                extra = extra[0] if extra else {}
                # e.g. a NaN placeholder metric made on the CPU: everything on self.device
                sums = torch.stack([torch.as_tensor(v).detach().float().reshape(()).to(self.device)
                                    for v in [loss_sum, tokens]
                                    + [extra[n] for n in self.metric_names]])
                return loss_sum * scale, {"sums": sums}

            return output, loss_func

        # batches are padded to their longest row (data/training.py); under PP all micro batches of
        # the run share one length, the [s, b, h] shape the stages exchange
        seq_length = micro_batches[0]["input_ids"].shape[1]
        results = get_forward_backward_func()(
            forward_step_func=step_func, data_iterator=iter(micro_batches),
            model=[self.schedule_model], num_microbatches=len(micro_batches),
            seq_length=seq_length, micro_batch_size=self.loop.micro_batch_size,
            forward_only=forward_only, **self.schedule_kwargs)
        sums = torch.zeros(2 + len(self.metric_names), device=self.device)
        for r in results or []:
            sums += r["sums"]
        return sums

    def train_step(self, step: int) -> dict:
        data, loop = self.train_data, self.loop
        micro = data.micro_batches(step, loop.global_batch_size, loop.micro_batch_size,
                                   self.dp_rank, self.dp, same_length=self.pipelined)
        total_tokens = max(1, data.num_loss_tokens(step, loop.global_batch_size))
        # see module docstring: the schedule divides by num_microbatches, DDP averages over dp
        scale = len(micro) * self.dp / total_tokens
        lr = self.scheduler.apply(self.optimizer, step)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = self._run_schedule(micro, scale, forward_only=False)
        self.model.finish_grad_sync()
        ok, grad_norm, _ = self.optimizer.step()
        sums = _reduce_for_log(sums)
        positions = sum(int((b["segment_ids"] >= 0).sum()) for b in micro) * self.dp
        return dict(loss=float(sums[0] / sums[1].clamp(min=1)), lr=lr,
                    grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                    update_ok=bool(ok), tokens=positions, **self._metric_means(sums))

    def _metric_means(self, sums: torch.Tensor) -> dict:
        return {n: float(sums[2 + i] / sums[1].clamp(min=1))
                for i, n in enumerate(self.metric_names)}

    @torch.no_grad()
    def validate(self) -> Optional[float]:
        if self.val_data is None:
            return None
        self.model.eval()
        total = torch.zeros(2 + len(self.metric_names), device=self.device)
        for rows in self.val_data.eval_batches(self.loop.global_batch_size,
                                               self.loop.limit_val_batches):
            micro = self.val_data.rows_to_micro_batches(rows, self.loop.micro_batch_size,
                                                        self.dp_rank, self.dp, self.pipelined)
            total += self._run_schedule(micro, 1.0, forward_only=True)
        self.model.train()
        total = _reduce_for_log(total)
        loss = float(total[0] / total[1].clamp(min=1))
        self.last_val_metrics = dict(loss=loss, **self._metric_means(total))
        return loss

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> str:
        state = dict(step=self.state.step, scheduler=self.scheduler.state_dict(),
                     global_batch_size=self.loop.global_batch_size, **self.extra_state)
        return ckpt.save_checkpoint(self.loop.ckpt_dir, self.state.step, self.model.module,
                                    self.optimizer, state, keep_last=self.loop.keep_last_n_ckpts,
                                    identity=self.identity)

    def maybe_resume(self) -> Optional[str]:
        if not (self.loop.resume and self.loop.ckpt_dir):
            return None
        path = ckpt.latest_checkpoint(self.loop.ckpt_dir)
        if path is None:
            return None
        state = ckpt.load_checkpoint(path, self.model.module, self.optimizer)
        if state.get("global_batch_size") != self.loop.global_batch_size:
            from nemo_minitron.errors import CheckpointError

            raise CheckpointError(f"{path} was written with global_batch_size="
                                  f"{state.get('global_batch_size')}, now "
                                  f"{self.loop.global_batch_size}: the data position would differ")
        self.state.step = int(state["step"])
        return path

    # ---- the loop ----------------------------------------------------------------------------
    def _log(self, step, split, **metrics):
        if self.logger is not None:
            self.logger.log(step, split, **metrics)

    def fit(self) -> TrainState:
        loop = self.loop
        resumed = self.maybe_resume()
        if resumed and self.logger is not None:
            self.logger.info(f"resumed from {resumed} at step {self.state.step}")
        self.model.train()
        last_saved = self.state.step if resumed else None
        last_val = None
        while self.state.step < loop.max_steps:
            t0 = time.perf_counter()
            metrics = self.train_step(self.state.step)
            dt = time.perf_counter() - t0
            self.state.step += 1
            step = self.state.step
            metrics.update(step=step, step_time_s=dt, tokens_per_s=metrics["tokens"] / dt)
            self.state.history.append(metrics)
            if loop.log_every_n_steps and step % loop.log_every_n_steps == 0:
                self._log(step, "train", loss=metrics["loss"], lr=metrics["lr"],
                          grad_norm=metrics["grad_norm"], tokens_per_s=metrics["tokens_per_s"],
                          step_time_s=dt, **{n: metrics[n] for n in self.metric_names})
            if loop.val_check_interval and step % loop.val_check_interval == 0:
                last_val = (step, self.validate())
                self._log(step, "val", **self.last_val_metrics)
            if loop.ckpt_dir and loop.ckpt_every_n_steps and step % loop.ckpt_every_n_steps == 0:
                self.save()
                last_saved = step
            for cb in self.callbacks:
                cb(self, step, metrics)
        if self.val_data is not None and (last_val is None or last_val[0] != self.state.step):
            last_val = (self.state.step, self.validate())
            self._log(self.state.step, "val", **self.last_val_metrics)
        if loop.ckpt_dir and last_saved != self.state.step:
            self.save()
        self.state.val_loss = last_val[1] if last_val else None
        # every rank leaves together: on torch 2.3 + megatron-core 0.7.0 a rank that tears down
        # its process group while a pipeline peer still completes its last send can hang
        dist.barrier()
        return self.state
