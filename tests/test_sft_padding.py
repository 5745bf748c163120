"""Dynamic padding: a micro batch is cut to its longest row (a multiple of 16), not seq_length;
under PP every micro batch of a global batch has one length; training losses equal the old run
(``data.pad_to_max_length: true``, logits on every position) at PP=1 and PP=2; distillation's
logits on counted tokens only give the loss and gradients of logits everywhere (TP=1, TP=2)."""
import pytest
import torch

from nemo_minitron.data.training import PAD_MULTIPLE, Sample, SFTData
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


def test_packed_batches_carry_segment_ids_at_their_length():
    from nemo_minitron.data.packing import SegmentMask

    data = SFTData(_samples(), SEQ, EOS, packed=True, shuffle=False)
    [b] = data.rows_to_micro_batches([0], 1)
    assert b["input_ids"].shape == (1, 32)  # 5 + 22 = 27 positions -> 32
    # no [s, s] tensor in the batch: every tensor is [b, s]; the mask is the segment ids
    assert isinstance(b["attention_mask"], SegmentMask)
    assert all(v.shape == (1, 32) for k, v in b.items() if k != "attention_mask")
    assert b["attention_mask"].segment_ids is b["segment_ids"]
    assert b["attention_mask"].runs() == [[(0, 5, False), (5, 27, False), (27, 32, True)]]
    dense = b["attention_mask"].dense()  # the fallback, for Megatron's attention
    assert dense.shape == (1, 1, 32, 32)
    # True = may not attend: position 10 (2nd sample) sees 6 (its own sample), not 2 (the 1st)
    assert dense[0, 0, 10, 2] and not dense[0, 0, 10, 6]


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


# ---- packed rows through the SDPA per-segment path (no [s, s] mask) -----------------------------
def dense_mask_forward_step(model, batch):
    """The loop's forward step with packed rows' dense [b, 1, s, s] mask (the fallback path)."""
    from nemo_minitron.model.forward import counted_lm_loss

    mask = batch["attention_mask"]
    return counted_lm_loss(model, dict(batch, attention_mask=mask and mask.dense()))


def ignore_segments_forward_step(model, batch):
    """Negative control: every packed row one segment (causal attention across samples)."""
    from nemo_minitron.model.forward import counted_lm_loss
    from nemo_minitron.data.packing import SegmentMask

    seg = torch.where(batch["segment_ids"] >= 0, 0, -1)
    return counted_lm_loss(model, dict(batch, attention_mask=SegmentMask(seg)))


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_packed_training_without_mask_equals_dense_mask(small_hf, tp):
    """3 steps on packed SFT rows: SDPA per segment (the default for packed batches) against
    Megatron's DotProductAttention and SDPA, both with the dense mask: the same losses and
    gradient norms; ignoring the segments changes them."""
    kw = dict(steps=3, mbs=2, gbs=4, seq=SEQ, samples=varied_samples(), packed=True)
    runs = {name: run_ranks(lambda r: train(r, small_hf, attention_backend=be, forward_step=fs,
                                            **kw), world_size=tp, tp=tp)[-1]
            for name, be, fs in (("megatron", "megatron", None),
                                 ("sdpa_dense", "sdpa", dense_mask_forward_step),
                                 ("segments", "sdpa", None),
                                 ("broken", "sdpa", ignore_segments_forward_step))}
    ref = runs["megatron"]
    for name in ("sdpa_dense", "segments"):
        assert runs[name]["losses"] == pytest.approx(ref["losses"], abs=1e-5), name
        assert runs[name]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5), name
    assert runs["broken"]["losses"] != pytest.approx(ref["losses"], abs=1e-3)


def _largest_square_tensor(rank, hf_dir, dense):
    """The largest trailing ``[n, n]`` of any tensor an op makes in the forward and backward of
    one packed micro batch (4 rows) through the SDPA model: a dense mask or a full score matrix
    would be ``[.., s, s]``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.model.forward import counted_lm_loss
    from nemo_minitron.train.model import build_train_model

    class Sizes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.dim() >= 2 and t.shape[-1] == t.shape[-2]:
                    Sizes.largest = max(Sizes.largest, t.shape[-1])
            return out

    model = build_train_model(read_hf_config(hf_dir), precision="fp32", hf_dir=hf_dir,
                              attention_backend="sdpa")
    # rows of 48: no weight of the tiny model is [48, 48] (hidden 64), so only attention can be
    data = SFTData(varied_samples(), 48, EOS, packed=True, shuffle=False)
    batch = data.rows_to_micro_batches(list(range(len(data)))[:4], 4)[0]
    step = dense_mask_forward_step if dense else counted_lm_loss
    with Sizes():
        step(model, batch).sum().backward()
    return batch["input_ids"].shape[1], Sizes.largest


def test_packed_path_builds_no_seq_by_seq_tensor(small_hf):
    (s, seg), (_, dense) = [run_ranks(lambda r: _largest_square_tensor(r, small_hf, d))[0]
                            for d in (False, True)]
    assert dense == s  # the check sees the dense path's [b, 1, s, s] mask / [b, np, s, s] scores
    # the longest sample's [n, n] scores at most (varied_samples: 37 positions); s = 48 here
    assert seg < s and seg <= 37, (seg, s)
