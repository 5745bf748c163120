"""The finetune recipe end to end (config precedence, the CLI, the HF output), and its errors."""
import json
import os

import pytest
import torch

from nemo_minitron.cli import load_recipe, main as cli_main
from nemo_minitron.errors import ConfigError
from nemo_minitron.config.recipe import load_config
from nemo_minitron.train.config import FinetuneConfig
from tests.helpers import run_ranks
from tests.train_helpers import preimport  # noqa: F401  (warm forked workers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QA = [("What is the capital of France?", "Paris."), ("Name a primary color.", "Blue."),
      ("2 + 3 =", "5"), ("Opposite of hot?", "Cold.")]


@pytest.fixture()
def train_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QA))
    return str(path)


def test_config_precedence_defaults_yaml_overrides(tmp_path):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("trainer:\n  max_steps: 7\n  seed: 5\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(FinetuneConfig, str(yaml_path), ["trainer.max_steps=20", "optim.betas=[0.9,0.95]",
                                                       "data.train_ds.file_path=x.jsonl"])
    assert cfg.trainer.max_steps == 20  # override beats YAML
    assert cfg.trainer.seed == 5 and cfg.optim.lr == 1e-4  # YAML beats default
    assert cfg.optim.betas == [0.9, 0.95] and cfg.data.train_ds.file_path == "x.jsonl"
    assert cfg.model.micro_batch_size == FinetuneConfig().model.micro_batch_size  # default
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_stepz'"):
        load_config(FinetuneConfig, None, ["trainer.max_stepz=3"])
    yaml_path.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config(FinetuneConfig, str(yaml_path))
    with pytest.raises(ConfigError, match="trainer.max_steps='many' must be of type int"):
        load_config(FinetuneConfig, None, ["trainer.max_steps=many"])


@pytest.mark.parametrize("name", ["minitron_4b_width_sft.yaml", "tiny_sft.yaml"])
def test_shipped_configs_load_and_start_with_their_command(name):
    path = os.path.join(ROOT, "nemo_minitron", "conf", "finetune", name)
    load_config(FinetuneConfig, path)
    with open(path) as f:
        head = f.read(600)
    assert "finetune" in head and f"--config {name[:-5]} " in head


def test_cli_errors_before_training(tiny_hf_dir, train_jsonl, tmp_path, capsys):
    assert cli_main(["finetune", "--model", tiny_hf_dir, "--data", train_jsonl, "--out",
                     str(tmp_path / "o"), "trainer.nonsense=1"]) == 2
    assert "unknown config key 'trainer.nonsense'" in capsys.readouterr().err
    assert cli_main(["finetune", "--model", tiny_hf_dir, "--data", train_jsonl, "--out",
                     str(tmp_path / "o"), "out_format=zip"]) == 2
    assert "out_format='zip' must be one of auto, nemo_dir" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x"}\n')
    pytest.importorskip("tokenizers")
    assert cli_main(["finetune", "--model", tiny_hf_dir, "--data", str(bad), "--out",
                     str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: missing or non-string field(s) 'output'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def _run_recipe(rank, argv):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # the recipe sets up Megatron itself
    return load_recipe("finetune").main(argv)


def _read_hf(path):
    from nemo_minitron.checkpoint.hf_io import iter_tensors

    return dict(iter_tensors(path))


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(tp=2, nemo=True),
                                    dict(pp=2, nemo=True, nemo_dir=True)],
                         ids=["tp2", "pp2", "tp2-nemo", "pp2-nemo-dir"])
def test_export_gathers_tp_and_pp_bit_exactly(tiny_hf_dir, train_jsonl, tmp_path, layout):
    """Zero steps: the written HF checkpoint must be the base checkpoint, bit for bit."""
    pytest.importorskip("tokenizers", reason="needs the tokenizers library")
    out = str(tmp_path / ("out.nemo" if layout.get("nemo") and not layout.get("nemo_dir")
                          else "out"))
    base = tiny_hf_dir
    if layout.get("nemo"):  # .nemo in, .nemo out
        from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

        base = hf_to_nemo(tiny_hf_dir, str(tmp_path / "base.nemo"), progress=False)
    argv = ["--config", os.path.join(ROOT, "nemo_minitron/conf/finetune/tiny_sft.yaml"), "--model", base,
            "--data", train_jsonl, "--out", out, "trainer.max_steps=0",
            f"trainer.tensor_model_parallel_size={layout.get('tp', 1)}",
            f"trainer.pipeline_model_parallel_size={layout.get('pp', 1)}"]
    if layout.get("nemo_dir"):  # an extracted .nemo directory: the tar's tree, unpacked
        argv.append("out_format=nemo_dir")
    assert run_ranks(lambda r: _run_recipe(r, argv), world_size=2) == [0, 0]
    if layout.get("nemo"):  # written as .nemo: read it back through the converter
        from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

        if layout.get("nemo_dir"):
            assert os.path.isfile(os.path.join(out, "model_config.yaml"))
            assert os.path.isfile(os.path.join(out, "model_weights", ".metadata"))

        out, _ = nemo_to_hf(out, str(tmp_path / "back"), progress=False)
    base, new = _read_hf(tiny_hf_dir), _read_hf(out)
    assert sorted(new) == sorted(base)
    assert all(new[k].dtype == base[k].dtype and torch.equal(new[k], base[k]) for k in base)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, name))


def test_finetune_learns_and_transformers_reads_the_result(tiny_hf_dir, train_jsonl, tmp_path):
    pytest.importorskip("tokenizers", reason="needs the tokenizers library")
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "out")
    argv = ["--config", os.path.join(ROOT, "nemo_minitron/conf/finetune/tiny_sft.yaml"), "--model", tiny_hf_dir,
            "--data", train_jsonl, "--out", out, "trainer.max_steps=12",
            "trainer.ckpt_every_n_steps=6", "data.packed_sequence=true",
            f"data.validation_ds.file_path={train_jsonl}"]
    assert run_ranks(lambda r: _run_recipe(r, argv))[0] == 0
    rows = list(open(os.path.join(out + ".ckpt", "logs", "metrics.csv")))
    assert rows[0].strip() == "step,split,loss,lr,grad_norm,tokens_per_s,step_time_s"
    assert sorted(os.listdir(out + ".ckpt")) == ["latest", "logs", "run.json", "step_000006",
                                                 "step_000012"]

    # the answer-only loss as transformers computes it, before and after
    tok = transformers.AutoTokenizer.from_pretrained(out)

    def answer_loss(path):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        total = 0.0
        for q, a in QA:
            prompt = tok(q + "\n\n").input_ids
            ids = prompt + tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
            labels = [-100] * len(prompt) + ids[len(prompt):]
            with torch.no_grad():
                total += float(model(input_ids=torch.tensor([ids]),
                                     labels=torch.tensor([labels])).loss)
        return total / len(QA)

    before, after = answer_loss(tiny_hf_dir), answer_loss(out)
    # measured: about 10.6 before, about 3 after 12 steps at lr 3e-3
    assert after < before - 3.0, (before, after)
