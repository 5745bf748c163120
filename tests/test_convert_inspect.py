"""nemo-minitron inspect (every known bad state diagnosed, exit 1) and verify (logits vs transformers)."""
import json
import os
import shutil

import pytest
import yaml

from nemo_minitron.cli import main


@pytest.fixture(scope="module")
def extracted(tiny_hf_dir, tmp_path_factory):
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo
    from nemo_minitron.convert.nemo_file import safe_extract

    root = tmp_path_factory.mktemp("inspect")
    nemo = hf_to_nemo(tiny_hf_dir, str(root / "tiny.nemo"), progress=False)
    out = root / "extracted"
    out.mkdir()
    safe_extract(nemo, str(out))
    return nemo, str(out)


DROP = object()  # a key removed from model_config.yaml


def _run(capsys, path):
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    return code, out + err


def test_healthy_checkpoints(capsys, tiny_hf_dir, extracted):
    for path in (tiny_hf_dir, extracted[0], extracted[1]):
        code, out = _run(capsys, path)
        assert code == 0 and "no known problems found" in out, out
        assert "head_dim 32" in out and "stored dtype: bfloat16" in out


def _edited_nemo(extracted, tmp_path, change, drop_tokenizer=False):
    copy = tmp_path / "edited"
    shutil.copytree(extracted[1], copy)
    path = copy / "model_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.update(change)
    for key in [k for k, v in change.items() if v is DROP]:
        del cfg[key]
    path.write_text(yaml.safe_dump(cfg))
    if drop_tokenizer:
        shutil.rmtree(copy / "tokenizer")
    return copy


@pytest.mark.parametrize("change, drop_tokenizer, message", [
    ({"seq_len_interpolation_factor": 8}, False, "scales RoPE twice"),
    ({"scale_positional_embedding": False}, False, "llama3 RoPE scaling is missing"),
    ({"kv_channels": None}, False, "head_dim (kv_channels) = 16 is inconsistent with the stored "
                                   "linear_qkv (256 rows = 8 heads x 32): set kv_channels: 32"),
    ({"tokenizer": {"library": "huggingface", "type": "meta-llama/Meta-Llama-3-8B"}}, True,
     "is a gated hub id"),
    ({"vocab_size": 200000}, False, "fewer than the 200000-token vocabulary"),
    ({"precision": 16}, False, "precision 16"),
    ({"optim": DROP}, False, "no optim section: NeMo 24.05's restore fails"),
    ({"hidden_dropout": DROP, "attention_dropout": 0.1}, False,
     "hidden_dropout=0.1, attention_dropout=0.1 (absent: NeMo default): Llama has no dropout"),
])
def test_nemo_problems(capsys, extracted, tmp_path, change, drop_tokenizer, message):
    code, out = _run(capsys, _edited_nemo(extracted, tmp_path, change, drop_tokenizer))
    assert code == 1 and message in out, out


def test_hf_problems(capsys, tiny_hf_dir, tmp_path):
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    fp16 = write_tiny_hf_checkpoint(str(tmp_path / "fp16"), "tiny_minitron_depth", dtype="fp16",
                                    tokenizer=False)
    code, out = _run(capsys, fp16)
    assert code == 1 and "stored in fp16" in out and "no tokenizer.json" in out
    no_head_dim = shutil.copytree(tiny_hf_dir, tmp_path / "no_head_dim")
    cfg = json.loads((no_head_dim / "config.json").read_text())
    del cfg["head_dim"]  # transformers would then use 64/4 = 16
    cfg["rope_scaling"] = None
    (no_head_dim / "config.json").write_text(json.dumps(cfg))
    code, out = _run(capsys, no_head_dim)
    assert code == 1 and "head_dim=16 is inconsistent with the weights" in out
    assert "set head_dim: 32" in out and "llama3 RoPE scaling is missing" in out


def test_unreadable_input(capsys, tmp_path):
    code, out = _run(capsys, tmp_path)
    assert code == 2 and "neither a .nemo" in out


@pytest.mark.hf
def test_verify_passes_on_a_faithful_conversion_and_fails_on_another_model(capsys, tiny_hf_dir,
                                                                          extracted, tmp_path):
    pytest.importorskip("transformers")
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The while statement is used for repeated execution"})
                       + "\n")
    code, out = _run_verify(capsys, tiny_hf_dir, extracted[0], prompts)
    assert code == 0 and "PASS" in out and "top-1 agreement 100.00%" in out, out
    other = write_tiny_hf_checkpoint(str(tmp_path / "other_hf"), "tiny_llama31", seed=7)
    other_nemo = hf_to_nemo(other, str(tmp_path / "other.nemo"), progress=False)
    code, out = _run_verify(capsys, tiny_hf_dir, other_nemo, prompts)
    assert code == 1 and "FAIL" in out, out


def _run_verify(capsys, hf_dir, nemo, prompts):
    code = main(["verify", str(hf_dir), str(nemo), "--prompts", str(prompts)])
    out, err = capsys.readouterr()
    return code, out + err
