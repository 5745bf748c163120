"""The distillation hooks (nemo_minitron/train/distill.py) against torch.nn.functional on full logits,
at TP=1 and TP=2 (vocab shards, never gathered), and on the real tiny Megatron model: an identical
student has zero loss and zero gradients (also at PP=2); TP=2, DP=2, PP=2 and TP=2 x PP=2
distillation follow TP=1 (PP: megatron-core 0.16.1 through adjust_tensor_shapes_fn, 0.7.0 through
variable_seq_lengths).

Runs on both stacks (no tokenizer needed: synthetic tokens, a 2048-token vocabulary)."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_ranks
from tests.train_helpers import (EOS, SEQ, synthetic_samples, write_small_vocab_checkpoint,
                                 write_small_vocab_student)

B, S, V_PADDED, V_REAL = 2, 5, 40, 37  # 3 padded vocabulary columns, as Megatron pads


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, S, V_PADDED, generator=g) * 2
    teacher = torch.randn(B, S, V_PADDED, generator=g) * 2
    labels = torch.randint(0, V_REAL, (B, S), generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float32)
    return student, teacher, labels, mask


def _reference(student, teacher, labels, mask, *, temperature, reverse, kd_weight, lm_weight):
    """Independent: F.log_softmax / F.kl_div / F.cross_entropy on the full [b, s, v] logits."""
    log_ps = F.log_softmax(student[..., :V_REAL] / temperature, dim=-1)
    log_pt = F.log_softmax(teacher[..., :V_REAL] / temperature, dim=-1)
    # kl_div(input=log q, target=log p) is sum p * (log p - log q) = KL(p || q)
    kl = (F.kl_div(log_pt, log_ps, log_target=True, reduction="none") if reverse else
          F.kl_div(log_ps, log_pt, log_target=True, reduction="none")).sum(-1) * temperature ** 2
    # the student's LM loss is Megatron's, over the padded logits as in the default loop
    ce = F.cross_entropy(student.reshape(-1, V_PADDED), labels.reshape(-1),
                         reduction="none").view(B, S)
    kl_sum, ce_sum = (kl * mask).sum(), (ce * mask).sum()
    return kd_weight * kl_sum + lm_weight * ce_sum, kl_sum, ce_sum


CASES = [dict(temperature=1.0, reverse=False, kd_weight=1.0, lm_weight=0.0),  # Minitron
         dict(temperature=2.0, reverse=False, kd_weight=0.7, lm_weight=0.3),
         dict(temperature=1.5, reverse=True, kd_weight=1.0, lm_weight=0.5)]


def _loss_on_shard(rank, case):
    """loss_fn on this TP rank's vocabulary slice; returns (loss, tokens, metrics, grad slice)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.train.config import KDSection
    from nemo_minitron.train.distill import LogitDistillation

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    student, teacher, labels, mask = _inputs()
    cols = slice(r * V_PADDED // tp, (r + 1) * V_PADDED // tp)
    leaf = student[..., cols].clone().requires_grad_(True)
    kd = KDSection(loss="reverse_kl" if case["reverse"] else "forward_kl",
                   temperature=case["temperature"], kd_weight=case["kd_weight"],
                   lm_weight=case["lm_weight"], chunk_tokens=3)  # several chunks per micro batch
    hooks = LogitDistillation(teacher=None, kd=kd, vocab_size=V_REAL)
    # clones: the student logits are non-leaf in a model, and the teacher's are overwritten
    loss, tokens, metrics = hooks.loss_fn((leaf.clone(), teacher[..., cols].clone()),
                                          dict(loss_mask=mask, labels=labels))
    loss.backward()
    return float(loss), float(tokens), {k: float(v) for k, v in metrics.items()}, leaf.grad


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=["minitron", "fkl_t2_lm", "rkl_lm"])
def test_loss_fn_equals_torch_reference(tp, case):
    student, teacher, labels, mask = _inputs()
    leaf = student.clone().requires_grad_(True)
    ref, ref_kl, ref_ce = _reference(leaf, teacher, labels, mask, **case)
    ref.backward()
    results = run_ranks(lambda r: _loss_on_shard(r, case), world_size=tp, tp=tp)
    grads = []
    for loss, tokens, metrics, grad in results:  # every TP rank: the same global loss
        assert tokens == float(mask.sum())
        assert loss == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
        assert metrics["kl"] == pytest.approx(float(ref_kl), rel=1e-5, abs=1e-6)
        if case["lm_weight"] > 0:
            assert metrics["lm"] == pytest.approx(float(ref_ce), rel=1e-5)
        else:  # not computed in a training step without it
            assert math.isnan(metrics["lm"])
        grads.append(grad)
    grad = torch.cat(grads, dim=-1)  # the vocab shards side by side
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-6)
    if case["lm_weight"] == 0:  # padded vocabulary ids get no gradient from the KL
        assert torch.all(grad[..., V_REAL:] == 0)


# ---- the real tiny Megatron model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_small_vocab_checkpoint(str(tmp_path_factory.mktemp("t") / "teacher"))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A tiny_minitron_width-shaped student (different weights and width than the teacher)."""
    return write_small_vocab_student(str(tmp_path_factory.mktemp("s") / "student"))


def _identical_student(rank, hf_dir):
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.train.config import KDSection
    from nemo_minitron.data.training import SFTData
    from nemo_minitron.train.distill import LogitDistillation, build_teacher
    from nemo_minitron.train.model import build_train_model

    cfg = read_hf_config(hf_dir)
    teacher = build_teacher(cfg, hf_dir, precision="fp32")
    student = build_train_model(cfg, precision="fp32", hf_dir=hf_dir)
    batch = SFTData(synthetic_samples(4), SEQ, EOS, packed=True, seed=3).micro_batches(0, 1, 1)[0]
    hooks = LogitDistillation(teacher, KDSection(), vocab_size=cfg.vocab_size)
    loss, tokens, metrics = hooks.loss_fn(hooks.forward_step(student, batch), batch)
    loss.backward()
    grads = [p.grad.abs().max().item() for p in student.parameters()]
    frozen = all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    return float(loss), float(tokens), max(grads), len(grads), frozen, teacher.training


@pytest.mark.parametrize("tp", [1, 2])
def test_identical_student_has_zero_loss_and_zero_gradients(teacher_dir, tp):
    for loss, tokens, max_grad, n, frozen, training in run_ranks(
            lambda r: _identical_student(r, teacher_dir), world_size=tp, tp=tp):
        assert tokens > 0 and n > 10
        # TP=1: exactly 0. TP=2: two separately built copies differ in their logits by ~2e-6
        # (fp32 rounding, measured), which leaves ~5e-7 of KL and ~2e-7 of gradient; a student
        # that differs at all (tiny_minitron_width here) starts near 0.3 per token.
        assert abs(loss) / tokens < 1e-6 and max_grad < 1e-6, (loss, max_grad)
        assert frozen and not training  # the teacher: eval mode, no grads


def _distill(rank, teacher_dir, student_dir, steps=4, mbs=1, lm_weight=0.1,
             teacher_precision="fp32"):
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.train.config import KDSection, OptimSection
    from nemo_minitron.data.training import SFTData
    from nemo_minitron.train.distill import KD_METRICS, LogitDistillation, build_teacher
    from nemo_minitron.train.loop import LoopConfig, Trainer
    from nemo_minitron.train.model import build_train_model
    from nemo_minitron.train.optim import build_optimizer, build_scheduler, wrap_ddp

    teacher = build_teacher(read_hf_config(teacher_dir), teacher_dir, precision=teacher_precision)
    cfg = read_hf_config(student_dir)
    ddp = wrap_ddp(build_train_model(cfg, precision="fp32", hf_dir=student_dir))
    oc = OptimSection(lr=3e-3, min_lr=3e-4, warmup_steps=1, weight_decay=0.0)
    hooks = LogitDistillation(teacher, KDSection(temperature=2.0, lm_weight=lm_weight),
                              vocab_size=cfg.vocab_size)
    data = SFTData(synthetic_samples(8), SEQ, EOS, seed=7)
    trainer = Trainer(ddp, build_optimizer(ddp, oc, "fp32"), build_scheduler(oc, steps), data,
                      LoopConfig(max_steps=steps, micro_batch_size=mbs, global_batch_size=4,
                                 seq_length=SEQ, log_every_n_steps=0),
                      forward_step=hooks.forward_step, loss_fn=hooks.loss_fn,
                      metric_names=KD_METRICS, pipeline_io=hooks)
    state = trainer.fit()
    return [(m["loss"], m["kl"], m["lm"], m["grad_norm"]) for m in state.history]


# Same bound as the finetune loop's layouts (tests/test_train_loop.py): fp32 reduction order in
# split matmuls and the vocab-parallel softmax; a wrong normalization moves step 2 by > 1e-2.
LAYOUT_TOL = 1e-4


# pp2_mbs2: 2 micro batches of 2 sequences (1F1B with a warmup micro batch on stage 0) instead of
# 4 of 1, as the TP=1 reference; tp2pp2 and dp2pp2: 4 ranks.
LAYOUTS = [dict(tp=2), dict(world=2), dict(pp=2), dict(pp=2, mbs=2), dict(tp=2, pp=2),
           dict(pp=2, world=4)]


@pytest.mark.parametrize("layout", LAYOUTS,
                         ids=["tp2", "dp2", "pp2", "pp2_mbs2", "tp2pp2", "dp2pp2"])
def test_parallel_distillation_follows_tp1(teacher_dir, student_dir, layout):
    layout = dict(layout)
    mbs = layout.pop("mbs", 1)
    world = layout.pop("world", layout.get("tp", 1) * layout.get("pp", 1))
    ref = run_ranks(lambda r: _distill(r, teacher_dir, student_dir))[0]
    assert ref[-1][1] < ref[0][1]  # the KL goes down
    hists = run_ranks(lambda r: _distill(r, teacher_dir, student_dir, mbs=mbs), world_size=world,
                      **layout)
    for hist in hists:  # every rank reports the same (reduced over DP, broadcast over PP)
        for (loss, kl, lm, gn), (rloss, rkl, rlm, rgn) in zip(hist, ref):
            assert loss == pytest.approx(rloss, abs=LAYOUT_TOL)
            assert kl == pytest.approx(rkl, abs=LAYOUT_TOL) and lm == pytest.approx(rlm, abs=LAYOUT_TOL)
            assert gn == pytest.approx(rgn, rel=1e-4)


def test_identical_student_has_zero_loss_with_pp2(teacher_dir):
    """Student = teacher, PP=2 through the schedule (2 micro batches of 2): the teacher's stage-1
    input is the teacher half of what stage 0 sent, for the same micro batch; a stale or
    mismatched one leaves a KL near 0.3 per token (a differing student's starting KL)."""
    for hist in run_ranks(lambda r: _distill(r, teacher_dir, teacher_dir, steps=1, mbs=2,
                                             lm_weight=0.0), world_size=2, pp=2):
        (loss, kl, lm, gn), = hist
        assert abs(loss) < 1e-6 and abs(kl) < 1e-6 and gn < 1e-6, hist


def test_bf16_teacher_fp32_student_pp2_equals_pp1(teacher_dir, student_dir):
    """The pipeline carries the student's dtype: the bf16 teacher's hidden state crosses the stage
    boundary as fp32 and is cast back, which is exact, so PP=2 repeats PP=1 (measured: equal)."""
    ref = run_ranks(lambda r: _distill(r, teacher_dir, student_dir, steps=2,
                                       teacher_precision="bf16"))[0]
    for hist in run_ranks(lambda r: _distill(r, teacher_dir, student_dir, steps=2,
                                             teacher_precision="bf16"), world_size=2, pp=2):
        for got, want in zip(hist, ref):
            assert got == pytest.approx(want, abs=LAYOUT_TOL)
