"""Logit distillation (Minitron, shared/FACTS.md section 5) as hooks of the one training loop.

    teacher = build_teacher(teacher_cfg, TEACHER_DIR, precision="bf16")
    kd = LogitDistillation(teacher, KDSection(), vocab_size=student_cfg.vocab_size)
    Trainer(ddp_student, ..., forward_step=kd.forward_step, loss_fn=kd.loss_fn,
            metric_names=KD_METRICS)

``forward_step`` runs the frozen teacher (no grad) and the student on the same micro batch and
returns both logits ``[b, s, vocab/TP]`` -- vocab-parallel, never gathered. ``loss_fn`` turns them
into ``kd_weight * sum KL + lm_weight * sum CE`` over the counted tokens (``loss_mask``), with
:func:`nemo_minitron.losses.kd.vocab_parallel_kl` over this rank's vocabulary slice (all-reduces
over the TP group for the softmax normalisers) and Megatron's vocab-parallel cross entropy for the
student's LM loss. The teacher logits exist only for this loss, so the KL stores its gradient in
their memory (``reuse_teacher_logits``): distillation adds no ``[tokens, vocab/TP]`` buffer beyond
the teacher's logits themselves.

Pipeline parallelism is not supported yet: the teacher's stage would need its own
``set_input_tensor`` and its own p2p sends next to the student's inside Megatron's schedule.
:func:`check_layout` makes PP > 1 a ConfigError instead of a wrong answer.

Data: ``train/data.py``'s :func:`~nemo_minitron.train.data.build_datasets` (shared with finetune):
the SFT JSONL (loss on the answer) or plain text / JSONL ``text`` (pretraining-style, loss on every
token).

Hidden-state cosine losses (``kd.hidden_pairs``, nemo_minitron/losses/hidden.py) join through the
``hidden`` argument: its term is added in ``loss_fn`` and logged as the ``hidden`` metric.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Optional, Tuple

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import ConfigError

KD_METRICS = ("kl", "lm")  # per-token means logged for train and validation
HIDDEN_METRIC = "hidden"  # with kd.hidden_pairs: the mean over pairs of 1 - cosine, per token
KD_LOSSES = ("forward_kl", "reverse_kl")


# ---- checks before any process group exists -----------------------------------------------------
def check_layout(tp: int, pp: int) -> None:
    if pp != 1:
        raise ConfigError(f"trainer.pipeline_model_parallel_size={pp}: distillation supports TP and "
                          "DP only for now (the teacher would need its own pipeline "
                          "communication inside Megatron's schedule); use "
                          "pipeline_model_parallel_size=1")


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
def build_teacher(cfg: ModelConfig, hf_dir: str, precision: str, seed: int = 1234):
    """This rank's frozen teacher: no DDP wrapper, no optimizer, eval mode, requires_grad False."""
    from nemo_minitron.train.model import build_train_model

    teacher = build_train_model(cfg, precision=precision, hf_dir=hf_dir, seed=seed)
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

    def forward_step(self, model, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(student logits, teacher logits), each ``[b, s, vocab/TP]``."""
        inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=batch["attention_mask"])
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs)
        return model(**inputs), teacher_logits

    def loss_fn(self, output, batch):
        """(kd_weight * KL sum + lm_weight * CE sum [+ hidden_weight * hidden sum], counted
        tokens, {"kl": .., "lm": .. [, "hidden": ..]} sums).

        ``lm`` is computed when it is trained (lm_weight > 0) or in validation (no grad); in a
        training step without it, it is NaN rather than another pass over the logits."""
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from nemo_minitron.losses.kd import vocab_parallel_kl

        student, teacher = output  # [b, s, v_local]
        mask = batch["loss_mask"].to(torch.float32)  # [b, s], 1 = counted
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
            per_token = tensor_parallel.vocab_parallel_cross_entropy(student, batch["labels"])
            lm_sum = (per_token.float() * mask).sum()
            if self.kd.lm_weight > 0:
                loss = loss + self.kd.lm_weight * lm_sum
        metrics = {"kl": kl_sum.detach(), "lm": lm_sum.detach()}
        if self.hidden is not None:
            hidden_sum = self.hidden.loss_sum(mask)
            loss = loss + self.kd.hidden_weight * hidden_sum
            metrics[HIDDEN_METRIC] = hidden_sum.detach()
        return loss, tokens, metrics

