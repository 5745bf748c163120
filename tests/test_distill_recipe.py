"""The distill recipe end to end (CLI, configs, errors before training, the HF output) on the tiny
teacher and a tiny_minitron_width student with the real Llama-3 tokenizer and pydoc text."""
import hashlib
import json
import os
import re
import shutil

import pytest
import torch

from nemo_minitron.cli import load_recipe, main as cli_main
from nemo_minitron.config.recipe import load_config
from nemo_minitron.train.config import DistillConfig
from tests.helpers import run_ranks
from tests.train_helpers import preimport  # noqa: F401  (warm forked workers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "nemo_minitron", "conf", "distill", "tiny.yaml")


@pytest.mark.parametrize("name", ["llama31_8b_to_minitron_4b_width.yaml", "tiny.yaml"])
def test_shipped_configs_load_and_start_with_their_command(name):
    path = os.path.join(ROOT, "nemo_minitron", "conf", "distill", name)
    cfg = load_config(DistillConfig, path)
    assert cfg.kd.loss == "forward_kl" and cfg.kd.temperature == 1.0 and cfg.kd.lm_weight == 0.0
    with open(path) as f:
        head = f.readlines()[:4]
    # the shipped config by name: nemo-minitron configs distill
    assert any("distill" in line and re.search(rf"--config {name[:-5]}\b", line) for line in head)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    return write_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("s") / "student"),
                                    "tiny_minitron_width", seed=1, dtype="float32")


def _digest(path):
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def test_cli_errors_before_training(tiny_hf_dir, student_dir, tmp_path, capsys):
    base = ["distill", "--teacher", tiny_hf_dir, "--student", student_dir, "--data", "pydoc",
            "--out", str(tmp_path / "o")]
    assert cli_main(base + ["trainer.pipeline_model_parallel_size=2"]) == 2  # one process
    assert "world size 1 is not a multiple of TP*PP = 1*2" in capsys.readouterr().err
    assert cli_main(base + ["kd.loss=jsd"]) == 2
    assert "kd.loss='jsd': choose one of forward_kl, reverse_kl" in capsys.readouterr().err
    assert cli_main(base + ["kd.kd_weight=0"]) == 2
    assert "not both 0" in capsys.readouterr().err
    assert cli_main(base[:1] + base[3:]) == 2
    assert "no teacher given" in capsys.readouterr().err

    # a student with another vocabulary: refused before any model is built
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config import get_preset

    other = write_tiny_hf_checkpoint(str(tmp_path / "other"),
                                     get_preset("tiny_minitron_width").replace(vocab_size=2048),
                                     tokenizer=False)
    assert cli_main(base[:3] + ["--student", other] + base[5:]) == 2
    assert "needs the same tokenizer" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def _run_recipe(rank, argv):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # the recipe sets up Megatron itself
    recipe = load_recipe("distill")
    cfg = recipe.load_recipe_config(None, argv)
    state = recipe.run(cfg)
    return state.val_metrics, [(m["kl"], m["loss"]) for m in state.history]


def test_distillation_lowers_held_out_kl(tiny_hf_dir, student_dir, tmp_path):
    pytest.importorskip("tokenizers", reason="the NeMo 24.05 venv has no tokenizers")
    transformers = pytest.importorskip("transformers")
    teacher_digest = _digest(tiny_hf_dir)
    # pydoc text, 48 samples of 32 positions: the last 8 held out (never trained on)
    common = [f"teacher.restore_from_path={tiny_hf_dir}", f"model.restore_from_path={student_dir}",
              "data.train_ds.file_path=pydoc", "data.train_ds.max_num_samples=40",
              "data.val_samples=8", "data.seq_length=32", "trainer.precision=fp32",
              "trainer.progress_bar=false", "model.micro_batch_size=4", "model.global_batch_size=8",
              "optim.lr=3.0e-3", "optim.min_lr=3.0e-4", "optim.warmup_steps=1", "optim.weight_decay=0"]
    before, _ = run_ranks(lambda r: _run_recipe(r, common + [f"out={tmp_path / 'o0'}",
                                                             "trainer.max_steps=0"]))[0]
    out = str(tmp_path / "out")
    after, hist = run_ranks(lambda r: _run_recipe(r, common + [f"out={out}", "trainer.max_steps=8",
                                                               "trainer.ckpt_every_n_steps=4"]))[0]
    # KL(teacher || student) per token, and the student's LM loss, on the held-out samples.
    # measured: kl 1.01 -> 0.73 after 8 steps; lm 12.17 -> 12.00 (the random bf16 tiny teacher is
    # near uniform, so the student's LM loss stays near ln(128256) = 11.76)
    assert after["kl"] < before["kl"] - 0.1, (before, after)
    assert all(kl == loss for kl, loss in hist)  # Minitron: the loss is the KL alone
    assert after["lm"] == pytest.approx(before["lm"], abs=1.0)  # reported, ~ln(128256)
    assert _digest(tiny_hf_dir) == teacher_digest  # the teacher is never written

    rows = list(open(os.path.join(out + ".ckpt", "logs", "metrics.csv")))
    assert rows[0].strip() == "step,split,loss,lr,grad_norm,tokens_per_s,step_time_s,kl,lm"
    assert sorted(os.listdir(out + ".ckpt")) == ["latest", "logs", "run.json", "step_000004",
                                                 "step_000008"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["hidden_size"] == 48  # the student's architecture

    # transformers reads the distilled student; its weights moved from the initial student's
    a = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    b = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[128000, 791, 4062, 14198, 39935]])
    with torch.no_grad():
        assert not torch.allclose(a(ids).logits, b(ids).logits)


def test_data_formats(tiny_hf_dir, tmp_path):
    """Text (pydoc, .txt, JSONL text): every position counted, the last val_samples held out.
    SFT JSONL: the finetune data path (loss on the answer only)."""
    pytest.importorskip("tokenizers", reason="the NeMo 24.05 venv has no tokenizers")
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.data.calibration import token_samples
    from nemo_minitron.data.training import data_format

    recipe = load_recipe("distill")
    model_cfg = read_hf_config(tiny_hf_dir)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"input": "2 + 3 =", "output": "5"}) + "\n")
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "Hello there. " * 40}) + "\n")
    assert [data_format(p, "auto") for p in ("pydoc", str(sft), str(text))] == ["text", "sft", "text"]
    assert data_format(str(sft), "text") == "text"  # an explicit format wins

    def cfg(path, *extra):
        return recipe.load_recipe_config(None, [f"model.restore_from_path={tiny_hf_dir}",
                                                f"data.train_ds.file_path={path}",
                                                "data.seq_length=16", *extra])

    fmt, train, val = recipe.setup_data(cfg("pydoc", "data.train_ds.max_num_samples=6",
                                            "data.val_samples=2", "data.shuffle=false"), model_cfg)
    ids = token_samples("pydoc", tiny_hf_dir, 16, 8)  # the same stream, independently cut
    assert fmt == "text" and len(train) == 6 and len(val) == 2
    assert torch.equal(train.rows[0]["input_ids"], ids[0, :-1])
    assert torch.equal(train.rows[5]["labels"], ids[5, 1:])
    assert torch.equal(val.rows[1]["labels"], ids[7, 1:])  # held out: the last samples
    assert all(bool(r["loss_mask"].all()) for r in train.rows + val.rows)

    fmt, train, val = recipe.setup_data(cfg(sft), model_cfg)
    mask = train.rows[0]["loss_mask"]
    assert fmt == "sft" and val is None and 0 < mask.sum() < (train.rows[0]["segment_ids"] >= 0).sum()


def _run_recipe_steps(rank, argv):
    """(step, loss, kl) per step this run trained, the final validation metrics, the rank."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # the recipe sets up Megatron itself
    recipe = load_recipe("distill")
    state = recipe.run(recipe.load_recipe_config(None, argv))
    return [(m["step"], m["loss"], m["kl"]) for m in state.history], state.val_metrics


def test_recipe_with_two_pipeline_stages_resumes_and_follows_pp1(tiny_hf_dir, student_dir,
                                                                  tmp_path):
    """trainer.pipeline_model_parallel_size=2 end to end: 2 steps, then a second run resumes from
    the step-2 checkpoint for steps 3-4; losses, held-out metrics and the written student follow
    one uninterrupted PP=1 run."""
    pytest.importorskip("tokenizers", reason="the NeMo 24.05 venv has no tokenizers")
    from safetensors.torch import load_file
    common = [f"teacher.restore_from_path={tiny_hf_dir}", f"model.restore_from_path={student_dir}",
              "data.train_ds.file_path=pydoc", "data.train_ds.max_num_samples=16",
              "data.val_samples=4", "data.seq_length=16", "trainer.precision=fp32",
              "trainer.progress_bar=false", "model.micro_batch_size=2", "model.global_batch_size=4",
              "optim.lr=3.0e-3", "optim.min_lr=3.0e-4", "optim.warmup_steps=1",
              "optim.weight_decay=0", "trainer.ckpt_every_n_steps=2"]
    ref_hist, ref_val = run_ranks(lambda r: _run_recipe_steps(
        r, common + [f"out={tmp_path / 'pp1'}", "trainer.max_steps=4"]))[0]
    pp2 = common + [f"out={tmp_path / 'pp2'}", "trainer.pipeline_model_parallel_size=2"]
    first = run_ranks(lambda r: _run_recipe_steps(r, pp2 + ["trainer.max_steps=2"]),
                      world_size=2)
    shutil.rmtree(tmp_path / "pp2")  # the first run's output; the checkpoints stay in pp2.ckpt
    second = run_ranks(lambda r: _run_recipe_steps(r, pp2 + ["trainer.max_steps=4"]),
                       world_size=2)
    assert sorted(os.listdir(tmp_path / "pp2.ckpt")) == ["latest", "logs", "run.json",
                                                         "step_000002", "step_000004"]
    for (h1, _), (h2, val) in zip(first, second):  # both stages report the same numbers
        assert [h[0] for h in h1] == [1, 2] and [h[0] for h in h2] == [3, 4]  # resumed at 2
        # measured: the same to the 6 logged digits (fp32; the bound allows for reduction order)
        for (step, loss, kl), (rstep, rloss, rkl) in zip(h1 + h2, ref_hist):
            assert step == rstep and loss == pytest.approx(rloss, abs=1e-4)
            assert kl == loss  # Minitron: the loss is the KL alone
        assert val["kl"] == pytest.approx(ref_val["kl"], abs=1e-4)
        assert val["lm"] == pytest.approx(ref_val["lm"], abs=1e-4)
    # the written student: both stages' layers, the same weights as the PP=1 run's
    def weights(out):
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            files = set(json.load(f)["weight_map"].values())
        return {k: v for name in files for k, v in load_file(os.path.join(out, name)).items()}

    ref, got = weights(tmp_path / "pp1"), weights(tmp_path / "pp2")
    assert sorted(got) == sorted(ref)
    for name, tensor in ref.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)
