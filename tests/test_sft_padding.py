"""Dynamic padding: a micro batch is cut to its longest row (a multiple of 16), not seq_length;
under PP every micro batch of a global batch has one length; training losses equal the old run
(``data.pad_to_max_length: true``, logits on every position) at PP=1 and PP=2; distillation's
logits on counted tokens only give the loss and gradients of logits everywhere (TP=1, TP=2)."""
import pytest
import torch

from nemo_minitron.train.data import PAD_MULTIPLE, Sample, SFTData
from tests.helpers import run_ranks
from tests.train_helpers import EOS, synthetic_samples, train, write_small_vocab_checkpoint

SEQ = 64  # synthetic samples use 7..17 positions: dynamic batches are 16 or 32 long


def _samples():
    # one short (5 positions) and one long (21 positions) sample
    return [Sample(prompt=[1, 5, 6], answer=[7, 8, EOS]),
            Sample(prompt=[1] + list(range(10, 20)), answer=list(range(20, 31)) + [EOS])]


def test_micro_batches_are_cut_to_their_longest_row():
    data = SFTData(_samples(), SEQ, EOS, shuffle=False)
    short, long_ = data.rows_to_micro_batches([0, 1], 1)
    assert short["input_ids"].shape == (1, PAD_MULTIPLE) and long_["input_ids"].shape == (1, 32)
    assert all(short[k].shape[1] == 16 for k in ("labels", "loss_mask", "position_ids"))
    assert short["attention_mask"] is None  # no packing: causal attention, no [b,1,s,s] mask
    # nothing counted was cut: the same tokens carry loss as in the stored seq_length row
    for b, r in ((short, 0), (long_, 1)):
        assert b["loss_mask"].sum() == data.row(r)["loss_mask"].sum()
    # PP: one length for the whole global batch, on every DP rank
    for rank in (0, 1):
        [b] = data.rows_to_micro_batches([0, 1], 1, dp_rank=rank, dp=2, same_length=True)
        assert b["input_ids"].shape == (1, 32)
    fixed = SFTData(_samples(), SEQ, EOS, shuffle=False, pad_to_max_length=True)
    assert fixed.rows_to_micro_batches([0], 1)[0]["input_ids"].shape == (1, SEQ)


def test_packed_batches_keep_the_block_mask_at_their_length():
    data = SFTData(_samples(), SEQ, EOS, packed=True, shuffle=False)
    [b] = data.rows_to_micro_batches([0], 1)
    assert b["input_ids"].shape == (1, 32)  # 5 + 21 = 26 positions -> 32
    assert b["attention_mask"].shape == (1, 1, 32, 32)
    # True = may not attend: position 10 (2nd sample) sees 6 (its own sample), not 2 (the 1st)
    assert b["attention_mask"][0, 0, 10, 2] and not b["attention_mask"][0, 0, 10, 6]


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return write_small_vocab_checkpoint(str(tmp_path_factory.mktemp("hf") / "small"))


def varied_samples():
    """synthetic_samples with every third prompt 20 tokens longer: 7..37 positions, so micro
    batches of one global batch come out 16 and 32 (or 48) long."""
    out = synthetic_samples(8)
    return [Sample(prompt=s.prompt + list(range(100, 120)), answer=s.answer) if i % 3 == 0 else s
            for i, s in enumerate(out)]


def test_varied_samples_give_unequal_micro_batches():
    data = SFTData(varied_samples(), SEQ, EOS, seed=7)
    per_micro = [b["input_ids"].shape[1] for st in range(3) for b in data.micro_batches(st, 4, 2)]
    assert len(set(per_micro)) > 1 and max(per_micro) < SEQ, per_micro
    pp = [b["input_ids"].shape[1] for b in data.micro_batches(0, 4, 2, same_length=True)]
    assert len(set(pp)) == 1, pp


def full_logits_forward_step(model, batch):
    """The loop's old forward step: the model's own loss, logits on every position."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 attention_mask=batch["attention_mask"], labels=batch["labels"])


@pytest.mark.parametrize("pp", [1, 2], ids=["pp1", "pp2"])
def test_dynamic_padding_trains_like_fixed_padding(small_hf, pp):
    """Old (rows padded to seq_length, logits on every position) against new (micro batches cut
    to their longest row, logits on counted tokens only): the same losses and gradient norms over
    3 steps (mbs 2: micro batches of one global batch differ in length at PP=1, and share the
    global batch's longest at PP=2)."""
    kw = dict(steps=3, mbs=2, gbs=4, seq=SEQ, samples=varied_samples())
    fixed, dynamic = [
        run_ranks(lambda r: train(r, small_hf, pad_to_max_length=f, forward_step=step, **kw),
                  world_size=pp, pp=pp)[-1]
        for f, step in ((True, full_logits_forward_step), (False, None))]
    # measured: equal to ~1e-7 (matmul shapes differ, so rounding may)
    assert dynamic["losses"] == pytest.approx(fixed["losses"], abs=1e-5)
    assert dynamic["grad_norms"] == pytest.approx(fixed["grad_norms"], rel=1e-5)
    assert fixed["losses"][-1] < fixed["losses"][0]


def test_synthetic_set_really_gets_shorter_batches():
    data = SFTData(synthetic_samples(8), SEQ, EOS, seed=7)
    lengths = {b["input_ids"].shape[1] for b in data.micro_batches(0, 8, 2)}
    assert lengths <= {16, 32} and lengths, lengths
    assert torch.equal(data.micro_batches(0, 8, 2)[0]["input_ids"],
                       data.micro_batches(0, 8, 2)[0]["input_ids"])  # deterministic


def _distill_counted_vs_full(rank, teacher_dir, student_dir):
    """KD + LM loss and student gradients of one micro batch (2 rows of unequal length): logits on
    counted tokens only (the hooks' forward_step) vs the teacher's and student's logits on every
    position (the old forward step)."""
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.train.config import KDSection
    from nemo_minitron.train.distill import LogitDistillation, build_teacher
    from nemo_minitron.train.model import build_train_model

    teacher = build_teacher(read_hf_config(teacher_dir), teacher_dir, precision="fp32")
    cfg = read_hf_config(student_dir)
    student = build_train_model(cfg, precision="fp32", hf_dir=student_dir)
    hooks = LogitDistillation(teacher, KDSection(temperature=2.0, lm_weight=0.5),
                              vocab_size=cfg.vocab_size)
    batch = SFTData(varied_samples(), SEQ, EOS, shuffle=False).rows_to_micro_batches([0, 1], 2)[0]
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}
    out = {}
    for name in ("counted", "full"):
        student.zero_grad()
        if name == "counted":
            logits = hooks.forward_step(student, batch)
        else:
            with torch.no_grad():
                t = teacher(**inputs)
            logits = (student(**inputs), t)
        assert logits[0].shape[:2] == ((1, int(batch["loss_mask"].sum())) if name == "counted"
                                       else batch["loss_mask"].shape)
        loss, tokens, metrics = hooks.loss_fn(logits, batch)
        loss.backward()
        out[name] = (float(loss), float(metrics["kl"]), float(metrics["lm"]),
                     {n: p.grad.clone() for n, p in student.named_parameters()})
    return out


@pytest.fixture(scope="module")
def small_student(tmp_path_factory):
    from tests.train_helpers import write_small_vocab_student

    return write_small_vocab_student(str(tmp_path_factory.mktemp("hf") / "student"))


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_distillation_logits_on_counted_tokens_only(small_hf, small_student, tp):
    for res in run_ranks(lambda r: _distill_counted_vs_full(r, small_hf, small_student),
                         world_size=tp, tp=tp):
        (loss_c, kl_c, lm_c, g_c), (loss_f, kl_f, lm_f, g_f) = res["counted"], res["full"]
        assert (loss_c, kl_c, lm_c) == pytest.approx((loss_f, kl_f, lm_f), rel=1e-5)
        for n in g_f:
            assert torch.allclose(g_c[n], g_f[n], atol=1e-6, rtol=1e-4), n
