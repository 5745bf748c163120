"""Hidden-state cosine distillation (nemo_minitron/losses/hidden.py) on the real tiny Megatron models.

* The hooked loss equals a torch.nn.functional reference computed from transformers' Llama hidden
  states (an independent implementation, full forward, no Megatron) at TP=1 and TP=2, with the
  loss mask; the projection's gradient too, identical on both TP ranks.
* An identical student of the same width (no projection): loss 0.
* The projection trains, is saved in and resumed from the training checkpoint, and is not exported;
  TP=2 and DP=2 runs (saved and resumed) follow TP=1 with the copies of the projection equal.
* Config errors name the problem before any model is built; the recipe end to end with pairs.

Small 2048-token vocabulary (tests/train_helpers.py), so most checks also run on the NeMo 24.05 tier;
the transformers reference skips there (and the recipe test needs the real tokenizer).
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.errors import ConfigError
from nemo_minitron.train.config import KDSection
from tests.convert_helpers import read_hf_dir
from tests.helpers import run_ranks
from tests.train_helpers import (EOS, SEQ, synthetic_samples, write_small_vocab_checkpoint,
                                 write_small_vocab_student)

# (student layer, teacher layer): the tiny models have 4 layers each; "final" = layer 3's output
PAIRS = [[0, 1], [2, 2], ["final", "final"]]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_small_vocab_checkpoint(str(tmp_path_factory.mktemp("t") / "teacher"))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """tiny_minitron_width: hidden 48 vs the teacher's 64, so a projection is learned."""
    return write_small_vocab_student(str(tmp_path_factory.mktemp("s") / "student"), dtype="float32")


def _batch():
    from nemo_minitron.data.training import SFTData

    # two rows, one sample each: the prompt positions and the right padding carry no loss
    return SFTData(synthetic_samples(2, seed=5), SEQ, EOS, shuffle=False).micro_batches(0, 2, 2)[0]


def _models(teacher_dir, student_dir, pairs, seed=1234):
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.losses.hidden import HiddenDistillation
    from nemo_minitron.train.distill import LogitDistillation, build_teacher
    from nemo_minitron.train.model import build_train_model

    teacher = build_teacher(read_hf_config(teacher_dir), teacher_dir, precision="fp32")
    cfg = read_hf_config(student_dir)
    student = build_train_model(cfg, precision="fp32", hf_dir=student_dir)
    kd = KDSection(hidden_pairs=pairs, hidden_weight=0.5)
    hidden = HiddenDistillation(student, teacher, kd, seed=seed)
    return teacher, student, hidden, LogitDistillation(teacher, kd, cfg.vocab_size, hidden=hidden)


def _hooked_loss(rank, teacher_dir, student_dir):
    """(hidden loss sum, hidden metric, full loss minus KL, projection weights, their grads,
    the captured student layer-0 output) on this rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    _, student, hidden, kd = _models(teacher_dir, student_dir, PAIRS)
    batch = _batch()
    output = kd.forward_step(student, batch)
    h0 = hidden.student.outputs[0].detach().clone()
    loss, tokens, metrics = kd.loss_fn(output, batch)
    loss.backward()
    # TP: the layer output is the whole hidden state, the same on every rank (no sequence parallel)
    if ps.get_tensor_model_parallel_world_size() > 1:
        other = [torch.empty_like(h0) for _ in range(2)]
        dist.all_gather(other, h0, group=ps.get_tensor_model_parallel_group())
        assert torch.equal(other[0], other[1])
    weights = [p.detach().clone() for p in hidden.projection.parameters()]
    grads = [p.grad.clone() for p in hidden.projection.parameters()]
    return (float(metrics["hidden"]), float(loss.detach() - metrics["kl"]), float(tokens), weights,
            grads, list(h0.shape))


def _hf_hidden(hf_dir, input_ids, layers):
    """transformers' outputs of decoder layers ``layers`` (the final norm replaced by the identity,
    so the last hidden state is the last layer's raw output): {layer: [b, s, h]}."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
    hs = out.hidden_states  # (embeddings, layer 0, ..., layer n-1)
    assert len(hs) == model.config.num_hidden_layers + 1
    return {i: hs[i + 1] for i in layers}


@pytest.mark.parametrize("tp", [1, 2])
def test_hidden_loss_equals_functional_reference(teacher_dir, student_dir, tp):
    pytest.importorskip("transformers")
    batch = _batch()
    mask = batch["loss_mask"]
    assert 0 < mask.sum() < mask.numel()  # masking is exercised
    pairs = [(0, 1), (2, 2), (3, 3)]
    hs = _hf_hidden(student_dir, batch["input_ids"], {s for s, _ in pairs})
    ht = _hf_hidden(teacher_dir, batch["input_ids"], {t for _, t in pairs})
    results = run_ranks(lambda r: _hooked_loss(r, teacher_dir, student_dir), world_size=tp, tp=tp)
    weights = [w.clone().requires_grad_(True) for w in results[0][3]]
    assert len(weights) == 3 and weights[0].shape == (64, 48)  # student 48 -> teacher 64
    ref = 0
    for (s, t), w in zip(pairs, weights):
        cos = F.cosine_similarity(F.linear(hs[s], w), ht[t], dim=-1)  # [b, s]
        ref = ref + ((1 - cos) * mask).sum()
    ref = ref / len(pairs)
    ref.backward()
    for hidden, extra, tokens, w, grads, shape in results:
        assert shape == [batch["input_ids"].shape[1], 2, 48]  # [s, b, h]: the batch's length
        # the hook states vs transformers' full forward: fp32, different kernels
        assert hidden == pytest.approx(float(ref), rel=1e-4, abs=1e-5)
        assert extra == pytest.approx(0.5 * float(ref), rel=1e-4, abs=1e-5)  # hidden_weight 0.5
        assert tokens == float(mask.sum())
        for a, b in zip(w, results[0][3]):
            assert torch.equal(a, b)  # the same initial projection on every rank
        for g, ref_w in zip(grads, weights):
            torch.testing.assert_close(g, 0.5 * ref_w.grad, rtol=1e-3, atol=1e-6)
    if tp == 2:  # replicated projection: identical gradients on both ranks, so Adam keeps it equal
        for a, b in zip(results[0][4], results[1][4]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def _identical(rank, hf_dir):
    from nemo_minitron.losses.hidden import PROJECTION_ATTR

    teacher, student, hidden, kd = _models(hf_dir, hf_dir, [[0, 0], [1, 1], ["final", "final"]])
    batch = _batch()
    kd.loss_fn(kd.forward_step(student, batch), batch)  # captures released by loss_fn
    student(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"])
    with torch.no_grad():
        teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"])
    loss = hidden.loss_sum(batch["loss_mask"])
    return (float(loss), float(batch["loss_mask"].sum()), len(list(hidden.projection.parameters())),
            hasattr(student, PROJECTION_ATTR))


def test_identical_models_same_width_have_zero_hidden_loss(teacher_dir):
    loss, tokens, n_params, attached = run_ranks(lambda r: _identical(r, teacher_dir))[0]
    assert n_params == 0 and not attached  # same width: the identity, nothing to learn or save
    assert tokens > 0 and abs(loss) / tokens < 1e-6, loss  # fp32 rounding of cos(x, x) only


def _train(rank, teacher_dir, student_dir, ckpt_dir, steps, out=None):
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.losses.hidden import without_projection
    from nemo_minitron.train.config import OptimSection
    from nemo_minitron.data.training import SFTData
    from nemo_minitron.train.distill import kd_metric_names
    from nemo_minitron.train.export import save_final_output
    from nemo_minitron.train.loop import LoopConfig, Trainer
    from nemo_minitron.train.optim import build_optimizer, build_scheduler, wrap_ddp

    _, student, hidden, kd = _models(teacher_dir, student_dir, [[1, 1], ["final", "final"]])
    init = [p.detach().clone() for p in hidden.projection.parameters()]
    ddp = wrap_ddp(student)
    oc = OptimSection(lr=3e-3, min_lr=3e-4, warmup_steps=1, weight_decay=0.0)
    trainer = Trainer(ddp, build_optimizer(ddp, oc, "fp32"), build_scheduler(oc, 4),
                      SFTData(synthetic_samples(8), SEQ, EOS, seed=7),
                      LoopConfig(max_steps=steps, micro_batch_size=2, global_batch_size=4,
                                 seq_length=SEQ, log_every_n_steps=0, ckpt_dir=ckpt_dir),
                      forward_step=kd.forward_step, loss_fn=kd.loss_fn,
                      metric_names=kd_metric_names(kd.kd))
    resumed = trainer.maybe_resume()
    after_resume = [p.detach().clone() for p in hidden.projection.parameters()]
    state = trainer.fit()
    final = [p.detach().clone() for p in hidden.projection.parameters()]
    if out:
        with without_projection(student):
            save_final_output(student, read_hf_config(student_dir), out, base_dir=student_dir)
    return (resumed, init, after_resume, final, [m["hidden"] for m in state.history],
            [m["loss"] for m in state.history])


def test_projection_trains_resumes_and_is_not_exported(teacher_dir, student_dir, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _, init, _, two, hidden2, _ = run_ranks(lambda r: _train(r, teacher_dir, student_dir, ckpt, 2))[0]
    assert all(not torch.equal(a, b) for a, b in zip(init, two))  # the projection is trained
    assert len(hidden2) == 2 and all(0 < h < 2 for h in hidden2)  # logged as its own metric

    out = str(tmp_path / "out")
    resumed, init_b, loaded, four, hidden4, _ = run_ranks(
        lambda r: _train(r, teacher_dir, student_dir, ckpt, 4, out))[0]
    assert resumed and resumed.endswith("step_000002")
    assert all(torch.equal(a, b) for a, b in zip(init_b, init))  # seeded: the same fresh init
    assert all(torch.equal(a, b) for a, b in zip(loaded, two))  # restored from the checkpoint
    assert len(hidden4) == 2  # steps 3 and 4 only
    # an uninterrupted 4-step run ends at the same projection
    _, _, _, ref, ref_hidden, _ = run_ranks(
        lambda r: _train(r, teacher_dir, student_dir, str(tmp_path / "ckpt_ref"), 4))[0]
    for a, b in zip(four, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert hidden4 == pytest.approx(ref_hidden[2:], rel=1e-5)

    assert set(read_hf_dir(out)) == set(read_hf_dir(student_dir))  # the student's own weights only



@pytest.mark.parametrize("layout", [dict(tp=2), dict()], ids=["tp2", "dp2"])
def test_parallel_training_follows_tp1(teacher_dir, student_dir, tmp_path, layout):
    """TP=2: the replicated projection stays identical on both ranks; DP=2: DDP averages its
    gradient; either way a run saved after step 2 and resumed for step 3 follows an uninterrupted
    TP=1 run (same bound as the logit-distillation layouts)."""
    ref = run_ranks(lambda r: _train(r, teacher_dir, student_dir, None, 3))[0]
    ckpt = str(tmp_path / "ckpt")
    first = run_ranks(lambda r: _train(r, teacher_dir, student_dir, ckpt, 2), world_size=2,
                      **layout)
    runs = run_ranks(lambda r: _train(r, teacher_dir, student_dir, ckpt, 3), world_size=2,
                     **layout)
    for (_, _, _, _, h2, l2), (resumed, _, _, final, h3, l3) in zip(first, runs):
        assert resumed.endswith("step_000002")
        assert h2 + h3 == pytest.approx(ref[4], abs=1e-4)
        assert l2 + l3 == pytest.approx(ref[5], abs=1e-4)
        for a, b in zip(final, ref[3]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(runs[0][3], runs[1][3]):
        assert torch.equal(a, b)  # the two copies never drift apart


def test_config_errors_name_the_problem():
    from nemo_minitron.losses.hidden import check_hidden, parse_pairs
    from nemo_minitron.train.distill import check_kd

    assert parse_pairs([[0, 1], ["final", "final"]], 4, 2) == [(0, 1), (3, 1)]
    cases = [([[0, 4]], "kd.hidden_pairs[0][1] (teacher)=4: layer index out of range (0..3)"),
             ([[0, 1], [-1, 0]], "kd.hidden_pairs[1][0] (student)=-1: layer index out of range"),
             ([[0, 1, 2]], "kd.hidden_pairs[0]=[0, 1, 2] must be a pair"),
             ([3], "kd.hidden_pairs[0]=3 must be a pair"),
             ([["last", 0]], "kd.hidden_pairs[0][0] (student)='last': a layer is a 0-based"),
             ([[True, 0]], "a layer is a 0-based integer index"),
             ([[1, 1], [1, 1]], "lists a pair twice")]
    for pairs, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_hidden(KDSection(hidden_pairs=pairs), student_layers=4, teacher_layers=4)
    with pytest.raises(ConfigError, match="must be a pair"):
        check_kd(KDSection(hidden_pairs=[[0]]))  # shapes are checked with the other kd fields
    with pytest.raises(ConfigError, match="hidden_weight=-1.0 must be >= 0"):
        check_kd(KDSection(hidden_pairs=[[0, 0]], hidden_weight=-1.0))
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=2: hidden losses need"):
        check_hidden(KDSection(hidden_pairs=[[0, 0]]), pp=2)
    with pytest.raises(ConfigError, match="activations_checkpoint_granularity='full'"):
        check_hidden(KDSection(hidden_pairs=[[0, 0]]), recompute="full")
    check_hidden(KDSection(), pp=2, recompute="full")  # no pairs: nothing to refuse


def test_cli_refuses_bad_pairs_before_training(teacher_dir, tmp_path, capsys):
    from nemo_minitron.cli import main as cli_main

    base = ["distill", "--teacher", teacher_dir, "--student", teacher_dir, "--data", "pydoc",
            "--out", str(tmp_path / "o")]
    assert cli_main(base + ["kd.hidden_pairs=[[0,7]]"]) == 2
    err = capsys.readouterr().err
    assert "kd.hidden_pairs[0][1] (teacher)=7: layer index out of range (0..3)" in err
    assert cli_main(base + ["kd.hidden_pairs=[[0,1]]",
                            "model.activations_checkpoint_granularity=full"]) == 2
    assert "recomputed layers run their forward without autograd" in capsys.readouterr().err
    assert cli_main(base + ["kd.hidden_pairs=[0,1]"]) == 2
    assert "kd.hidden_pairs=0 must be a list" in capsys.readouterr().err  # the config loader's
    assert not os.path.exists(tmp_path / "o")


def _run_recipe(rank, argv):
    from megatron.core import parallel_state

    from nemo_minitron.cli import load_recipe

    parallel_state.destroy_model_parallel()  # the recipe sets up Megatron itself
    recipe = load_recipe("distill")
    state = recipe.run(recipe.load_recipe_config(None, argv))
    return state.val_metrics, [(m["loss"], m["kl"], m["hidden"]) for m in state.history]


@pytest.mark.slow  # ~10 s: the recipe on the real tokenizer and the 128256-token vocabulary
def test_recipe_with_hidden_pairs(tiny_hf_dir, tmp_path):
    """The distill recipe end to end with hidden pairs: the loss is KL + weight * hidden, the
    metric is logged, the exported student is exactly the student's architecture."""
    pytest.importorskip("tokenizers", reason="the NeMo 24.05 venv has no tokenizers")
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    student = write_tiny_hf_checkpoint(str(tmp_path / "student"), "tiny_minitron_width", seed=1,
                                       dtype="float32")
    out = str(tmp_path / "out")
    argv = [f"teacher.restore_from_path={tiny_hf_dir}", f"model.restore_from_path={student}",
            "data.train_ds.file_path=pydoc", "data.train_ds.max_num_samples=8", "data.val_samples=4",
            "data.seq_length=32", "trainer.precision=fp32", "trainer.progress_bar=false",
            "trainer.max_steps=2", "model.micro_batch_size=4", "model.global_batch_size=4",
            "kd.hidden_pairs=[[1,1],[final,final]]", "kd.hidden_weight=0.5", f"out={out}"]
    val, hist = run_ranks(lambda r: _run_recipe(r, argv))[0]
    for loss, kl, hidden in hist:
        assert 0 < hidden < 2 and loss == pytest.approx(kl + 0.5 * hidden, rel=1e-5)
    assert 0 < val["hidden"] < 2
    with open(os.path.join(out + ".ckpt", "logs", "metrics.csv")) as f:
        assert f.readline().strip().endswith(",kl,lm,hidden")
    assert set(read_hf_dir(out)) == set(read_hf_dir(student))  # no projection exported
