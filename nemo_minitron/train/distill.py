"""Logit distillation (Minitron, shared/FACTS.md section 5) as hooks of the one training loop.

    teacher = build_teacher(teacher_cfg, TEACHER_DIR, precision="bf16")
    kd = LogitDistillation(teacher, KDSection(), vocab_size=student_cfg.vocab_size)
    Trainer(ddp_student, ..., forward_step=kd.forward_step, loss_fn=kd.loss_fn,
            metric_names=KD_METRICS, pipeline_io=kd)  # pipeline_io: used at PP > 1

``forward_step`` runs the frozen teacher (no grad) and the student on the same micro batch and
returns both logits ``[1, n, vocab/TP]`` for the n tokens the loss counts (the LM heads skip
padding and prompt positions) -- vocab-parallel, never gathered. ``loss_fn`` turns them
into ``kd_weight * sum KL + lm_weight * sum CE`` over the counted tokens (``loss_mask``), with
:func:`nemo_minitron.losses.kd.vocab_parallel_kl` over this rank's vocabulary slice (all-reduces
over the TP group for the softmax normalisers) and Megatron's vocab-parallel cross entropy for the
student's LM loss. The teacher logits exist only for this loss, so the KL stores its gradient in
their memory (``reuse_teacher_logits``): distillation adds no ``[tokens, vocab/TP]`` buffer beyond
the teacher's logits themselves.

Pipeline parallelism: teacher and student use the same layout (each stage holds this stage's
layers of both). Between stages Megatron's schedule sends one activation, the student's and the
teacher's hidden states side by side, ``[s, b, h_s + h_t]`` (``adjust_tensor_shapes`` widens the
shapes the schedule sends and receives); :class:`PipelineStagePair` is what the schedule drives:
its ``set_input_tensor`` splits the received tensor into the student's ``[..., :h_s]`` (gradient
flows back through it) and the teacher's ``[..., h_s:]`` (no gradient: the teacher runs under
no_grad, so the teacher half of the gradient sent back is zero). The last stage produces both
logits for the loss as at PP=1; Megatron DDP and the optimizer see the student only. megatron-core
0.16.1's schedule takes ``adjust_tensor_shapes_fn``; 0.7.0 (NeMo 24.05) has no such argument and
sends each activation's shape ahead of it instead (``variable_seq_lengths``; see
:func:`nemo_minitron.compat.mcore.wide_pipeline_schedule_kwargs`).

Data: ``data/training.py``'s :func:`~nemo_minitron.data.training.build_datasets` (shared with finetune):
the SFT JSONL (loss on the answer) or plain text / JSONL ``text`` (pretraining-style, loss on every
token).

Hidden-state cosine losses (``kd.hidden_pairs``, nemo_minitron/losses/hidden.py) join through the
``hidden`` argument: its term is added in ``loss_fn`` and logged as the ``hidden`` metric.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Optional

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import ConfigError

KD_METRICS = ("kl", "lm")  # per-token means logged for train and validation
HIDDEN_METRIC = "hidden"  # with kd.hidden_pairs: the mean over pairs of 1 - cosine, per token
KD_LOSSES = ("forward_kl", "reverse_kl")


# ---- checks before any process group exists -----------------------------------------------------
def check_kd(kd) -> None:
    if kd.loss not in KD_LOSSES:
        raise ConfigError(f"kd.loss={kd.loss!r}: choose one of {', '.join(KD_LOSSES)}")
    if not kd.temperature > 0:
        raise ConfigError(f"kd.temperature={kd.temperature} must be positive")
    if kd.kd_weight < 0 or kd.lm_weight < 0 or kd.kd_weight + kd.lm_weight == 0:
        raise ConfigError(f"kd.kd_weight={kd.kd_weight}, kd.lm_weight={kd.lm_weight}: weights "
                          "must be >= 0 and not both 0")
    from nemo_minitron.losses.hidden import check_hidden

    check_hidden(kd)  # shapes and types; ranges and layout once the models' configs are read


def kd_metric_names(kd) -> tuple:
    return KD_METRICS + ((HIDDEN_METRIC,) if kd.hidden_pairs else ())


def _file_digest(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_same_tokenizer(teacher_dir: str, teacher: ModelConfig, student_dir: str,
                         student: ModelConfig) -> None:
    """Token ids must mean the same in both models: same vocabulary size, and the same
    ``tokenizer.json`` contents where both directories have one."""
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"teacher {teacher_dir} has vocab_size {teacher.vocab_size}, student "
                          f"{student_dir} has {student.vocab_size}: distillation on logits needs "
                          "the same tokenizer")
    t = _file_digest(os.path.join(teacher_dir, "tokenizer.json"))
    s = _file_digest(os.path.join(student_dir, "tokenizer.json"))
    if t is not None and s is not None and t != s:
        raise ConfigError(f"{teacher_dir}/tokenizer.json and {student_dir}/tokenizer.json differ: "
                          "distillation on logits needs the same tokenizer")


# ---- the teacher --------------------------------------------------------------------------------
def build_teacher(cfg: ModelConfig, hf_dir: str, precision: str, seed: int = 1234,
                  attention_backend: str = "auto"):
    """This rank's frozen teacher: no DDP wrapper, no optimizer, eval mode, requires_grad False;
    built without Megatron's random init (every weight is loaded next; the student, built after
    it, reseeds torch's generators first, so its own init and the draws after it are unchanged)."""
    from nemo_minitron.train.model import build_train_model

    teacher = build_train_model(cfg, precision=precision, hf_dir=hf_dir, seed=seed,
                                attention_backend=attention_backend, random_init=False)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ---- the hooks ----------------------------------------------------------------------------------
class LogitDistillation:
    """``forward_step`` / ``loss_fn`` for :class:`nemo_minitron.train.loop.Trainer`."""

    def __init__(self, teacher, kd, vocab_size: int, hidden=None):
        check_kd(kd)
        self.teacher, self.kd, self.vocab_size = teacher, kd, vocab_size
        self.hidden = hidden  # losses.hidden.HiddenDistillation (hooks on both models) or None

    def forward_step(self, model, batch):
        """Last pipeline stage: (student logits, teacher logits), each ``[1, n, vocab/TP]`` for
        the n tokens ``loss_mask`` counts (no LM head on padding or prompt positions,
        :func:`nemo_minitron.model.forward.logits_at`). Other stages: ``[s, b, h_s + h_t]``, the
        two hidden states for the next stage."""
        from megatron.core import parallel_state as ps

        from nemo_minitron.model.forward import counted_index, logits_at

        from nemo_minitron.model.attention import attention_mask_for

        inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        mask = batch["attention_mask"]  # packed rows: segment ids; dense only where needed
        index = counted_index(batch["loss_mask"])
        with torch.no_grad(), logits_at(self.teacher, index):
            teacher_out = self.teacher(**inputs, attention_mask=attention_mask_for(self.teacher,
                                                                                   mask))
        with logits_at(model, index):
            student_out = model(**inputs, attention_mask=attention_mask_for(model, mask))
        if ps.is_pipeline_last_stage():
            return student_out, teacher_out
        # the pipeline carries the student's dtype (config.pipeline_dtype)
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)

    # ---- pipeline parallelism (Trainer's pipeline_io) ------------------------------------------
    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        """Megatron's ``[(s, b, h_s)]`` -> ``[(s, b, h_s + h_t)]`` for both directions."""
        h_t = self.teacher.config.hidden_size
        return ([(*shape[:-1], shape[-1] + h_t) for shape in recv_shapes],
                [(*shape[:-1], shape[-1] + h_t) for shape in send_shapes])

    def wrap(self, model) -> "PipelineStagePair":
        return PipelineStagePair(model, self.teacher)

    def loss_fn(self, output, batch):
        """(kd_weight * KL sum + lm_weight * CE sum [+ hidden_weight * hidden sum], counted
        tokens, {"kl": .., "lm": .. [, "hidden": ..]} sums).

        ``lm`` is computed when it is trained (lm_weight > 0) or in validation (no grad); in a
        training step without it, it is NaN rather than another pass over the logits."""
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from nemo_minitron.losses.kd import vocab_parallel_kl
        from nemo_minitron.model.forward import counted_index, select_counted

        student, teacher = output  # [1, n, v_local]: the counted tokens only (forward_step)
        full_mask = batch["loss_mask"].to(torch.float32)  # [b, s], 1 = counted
        if student.shape[:-1] == full_mask.shape:  # [b, s, v_local]: logits at every position
            mask, labels = full_mask, batch["labels"]
        else:
            index = counted_index(full_mask)
            mask = select_counted(full_mask, index)  # [1, n]: ones (a zero if nothing counts)
            labels = select_counted(batch["labels"], index)  # [1, n]
        tokens = mask.sum()
        group = ps.get_tensor_model_parallel_group()
        v_local = student.shape[-1]
        kl_mean = vocab_parallel_kl(
            student, teacher, temperature=self.kd.temperature,
            reverse=self.kd.loss == "reverse_kl", loss_mask=mask,
            group=group if ps.get_tensor_model_parallel_world_size() > 1 else None,
            vocab_start=ps.get_tensor_model_parallel_rank() * v_local,
            vocab_size=self.vocab_size, chunk_tokens=self.kd.chunk_tokens,
            reuse_teacher_logits=True)
        kl_sum = kl_mean * tokens  # the loop wants sums; the mean is over the same tokens
        loss = self.kd.kd_weight * kl_sum
        lm_sum = torch.tensor(math.nan)
        if self.kd.lm_weight > 0 or not torch.is_grad_enabled():
            # after the KL: Megatron's CE may shift the logits in place (the KL saved no input)
            per_token = tensor_parallel.vocab_parallel_cross_entropy(student, labels)
            lm_sum = (per_token.float() * mask).sum()
            if self.kd.lm_weight > 0:
                loss = loss + self.kd.lm_weight * lm_sum
        metrics = {"kl": kl_sum.detach(), "lm": lm_sum.detach()}
        if self.hidden is not None:
            hidden_sum = self.hidden.loss_sum(full_mask)  # hidden states: every position
            loss = loss + self.kd.hidden_weight * hidden_sum
            metrics[HIDDEN_METRIC] = hidden_sum.detach()
        return loss, tokens, metrics


class PipelineStagePair:
    """This stage's student (the DDP model) and teacher, as Megatron's pipeline schedule sees them.

    Not an ``nn.Module``: nothing walks its parameters. Megatron finds ``config`` and
    ``model_type`` through ``.module`` (the DDP student); calling it runs the student."""

    def __init__(self, student, teacher):
        from megatron.core.utils import get_attr_wrapped_model

        self.module, self.teacher = student, teacher
        self._set_student_input = get_attr_wrapped_model(student, "set_input_tensor")
        self.student_hidden = get_attr_wrapped_model(student, "config").hidden_size
        self.teacher_dtype = teacher.config.params_dtype

    def set_input_tensor(self, input_tensor) -> None:
        """``[s, b, h_s + h_t]`` from the previous stage (None on the first stage), in a list as
        the schedule passes it."""
        x = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if x is None:
            student_in = teacher_in = None
        else:
            student_in = x[..., :self.student_hidden]
            teacher_in = x[..., self.student_hidden:].detach().to(self.teacher_dtype)
        self._set_student_input([student_in])
        self.teacher.set_input_tensor([teacher_in])

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

