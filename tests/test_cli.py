"""The nemo-minitron command: presets and info (in-process, plus one real console-script run)."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

from nemo_minitron.cli import main
from nemo_minitron.config import get_preset
from nemo_minitron.config.hf import to_hf_dict
from nemo_minitron.config.nemo import to_nemo_dict


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_presets(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("minitron_4b_width"))
    assert "4,512,746,496" in line and " 3072 " in line and " 128 " in line
    assert "8,030,261,248" in out


def test_info_preset(capsys):
    code, out, _ = run(capsys, "info", "minitron_4b_width", "--tp", "8", "--pp", "4")
    assert code == 0
    assert "head_dim 128" in out and "heads x head_dim = 4096 (hidden 3072, NOT hidden/heads)" in out
    assert "llama3 scaling factor 8" in out and "original context 8192" in out
    assert "4,512,746,496" in out and "layout TP=8 PP=4: ok" in out


@pytest.mark.parametrize("fmt, loader", [("json", json.loads), ("hf", json.loads),
                                         ("nemo", yaml.safe_load)])
def test_info_formats(capsys, fmt, loader):
    code, out, _ = run(capsys, "info", "tiny_llama31", "--format", fmt)
    assert code == 0
    expected = {"json": get_preset("tiny_llama31").to_dict(), "hf": to_hf_dict(get_preset("tiny_llama31")),
                "nemo": to_nemo_dict(get_preset("tiny_llama31"))}[fmt]
    assert loader(out) == expected


def test_info_reads_files(capsys, tmp_path):
    cfg = get_preset("minitron_4b_depth")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(to_hf_dict(cfg)))
    nemo_yaml = tmp_path / "model_config.yaml"
    nemo_yaml.write_text(yaml.safe_dump(to_nemo_dict(cfg)))
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    shutil.copy(nemo_yaml, extracted / "model_config.yaml")
    nemo_file = tmp_path / "model.nemo"
    with tarfile.open(nemo_file, "w") as tar:
        tar.add(nemo_yaml, arcname="./model_config.yaml")
    for source in (hf_dir, hf_dir / "config.json", nemo_yaml, extracted, nemo_file):
        code, out, err = run(capsys, "info", str(source), "--format", "json")
        assert code == 0, err
        assert json.loads(out) == cfg.to_dict(), source


@pytest.mark.parametrize("argv, message", [
    (["info", "minitron_4b_width", "--tp", "16"], "num_query_groups=8 is not divisible"),
    (["info", "minitron_9b"], "neither a preset"),
    (["info", "tiny_llama31", "--pp", "3"], "num_layers=4 is not divisible by pipeline"),
    # convert's output: --out (every command's spelling) or the older positional, exactly one
    (["convert", "hf-to-nemo", "hf", "a.nemo", "--out", "b.nemo"],
     "convert hf-to-nemo: the output is given twice (--out b.nemo and the positional a.nemo)"),
    (["convert", "nemo-to-hf", "in.nemo", "a", "--out", "b"],
     "convert nemo-to-hf: the output is given twice"),
    (["convert", "hf-to-nemo", "hf"], "convert hf-to-nemo: no output given: add --out PATH"),
    (["convert", "nemo-to-hf", "in.nemo"], "convert nemo-to-hf: no output given: add --out"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_files(capsys, tmp_path):
    bad_json = tmp_path / "config.json"
    bad_json.write_text(json.dumps(dict(to_hf_dict(get_preset("tiny_llama31")), mlp_bias=True)))
    code, _, err = run(capsys, "info", str(bad_json))
    assert code == 2 and "mlp_bias=True is not supported" in err
    not_tar = tmp_path / "broken.nemo"
    not_tar.write_bytes(b"\x00" * 100)
    code, _, err = run(capsys, "info", str(not_tar))
    assert code == 2 and "broken.nemo" in err
    empty_tar = tmp_path / "empty.nemo"
    with tarfile.open(empty_tar, "w"):
        pass
    code, _, err = run(capsys, "info", str(empty_tar))
    assert code == 2 and "no model_config.yaml" in err


def test_console_script_is_installed():
    exe = shutil.which("nemo-minitron", path=os.path.dirname(sys.executable))
    assert exe, "the nemo-minitron console script is not installed next to this python"
    proc = subprocess.run([exe, "info", "minitron_4b_width", "--tp", "3"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: num_attention_heads=32 is not divisible by "
                                   "tensor_model_parallel_size=3; num_query_groups=8 is not "
                                   "divisible by tensor_model_parallel_size=3")


# every parser of every command, with its arguments: (prog, option strings or dest, help)
HELP_COMMANDS = [["presets"], ["info"], ["prune"], ["finetune"], ["distill"], ["generate"],
                 ["eval-ppl"], ["convert", "hf-to-nemo"], ["convert", "nemo-to-hf"], ["inspect"],
                 ["verify"], ["lora", "merge"], ["lora", "export-peft"], ["eval-harness"],
                 ["serve"], ["slurm"], ["pipeline"], ["preprocess"], ["demo"]]


def _help_entries(monkeypatch, capsys):
    import argparse

    seen = []
    original = argparse._ActionsContainer.add_argument

    def add_argument(self, *args, **kwargs):
        action = original(self, *args, **kwargs)
        prog = getattr(self, "prog", None) or getattr(self, "_prog", "?")
        seen.append((prog, "/".join(action.option_strings) or action.dest, action.help))
        return action

    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", add_argument)
    for argv in HELP_COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0, argv
    capsys.readouterr()
    return seen


def test_every_help_entry_has_text_and_names_nemo_where_it_works(monkeypatch, capsys):
    seen = _help_entries(monkeypatch, capsys)
    assert {p for p, _, _ in seen} >= {"nemo-minitron prune", "nemo-minitron slurm",
                                       "nemo-minitron pipeline", "nemo-minitron finetune"}
    missing = [(p, a) for p, a, h in seen if not h]
    assert missing == []
    # every option that reads a model accepts a .nemo (through a temporary HF copy) and says so
    own = ("nemo-minitron prune", "nemo-minitron generate", "nemo-minitron eval-ppl",
           "nemo-minitron eval-harness", "nemo-minitron serve", "nemo-minitron pipeline",
           "nemo-minitron lora merge")
    for prog, arg, text in seen:
        if prog in own and arg in ("--model", "--teacher", "--base"):
            assert ".nemo" in text, (prog, arg, text)


def test_prune_takes_overwrite_as_every_command_does(tmp_path):
    from nemo_minitron.cli import load_recipe

    parse = load_recipe("prune").parse_args
    base = ["--model", "t", "--out", "s"]
    assert parse(base).overwrite is False
    assert parse(base + ["--overwrite"]).overwrite is True
    assert parse(base + ["overwrite=true"]).overwrite is True  # the config key still works


def test_export_peft_refuses_to_record_a_nemo_base(monkeypatch, capsys, tmp_path):
    from nemo_minitron.peft import adapter_io

    monkeypatch.setattr(adapter_io, "read_adapter", lambda d: ({"base_model": "/m/base.nemo"}, {}))
    out, ad = str(tmp_path / "peft"), str(tmp_path / "ad")
    code, _, err = run(capsys, "lora", "export-peft", "--adapter", ad, "--out", out)
    assert code == 2 and err.count("\n") == 1
    assert "the adapter's base /m/base.nemo is a .nemo" in err and "--base-model" in err
    code, _, err = run(capsys, "lora", "export-peft", "--adapter", ad, "--out", out,
                       "--base-model", "/m/other.nemo")
    assert code == 2 and "--base-model /m/other.nemo is a .nemo" in err
    assert not os.path.exists(out)


def test_eval_harness_takes_out_as_a_flag(monkeypatch, capsys):
    from nemo_minitron.inference import job

    seen = []
    monkeypatch.setattr(job, "run_eval_harness", seen.append)
    code, _, _ = run(capsys, "eval-harness", "--model", "m.nemo", "--tasks", "a,b", "--out", "r.json")
    assert code == 0 and (seen[0].model, seen[0].tasks, seen[0].out) == ("m.nemo", ["a", "b"], "r.json")


@pytest.mark.parametrize("direction, spelling", [
    ("hf-to-nemo", ["--out", "o"]), ("hf-to-nemo", ["o"]),
    ("nemo-to-hf", ["--out", "o"]), ("nemo-to-hf", ["o"]),
])
def test_convert_takes_out_or_the_older_positional(monkeypatch, capsys, direction, spelling):
    from nemo_minitron.convert import hf_to_nemo, nemo_to_hf

    seen = []
    monkeypatch.setattr(hf_to_nemo, "hf_to_nemo", lambda src, out, **kw: seen.append(out) or out)
    monkeypatch.setattr(nemo_to_hf, "nemo_to_hf",
                        lambda src, out, **kw: seen.append(out) or (out, "zarr"))
    code, out, err = run(capsys, "convert", direction, "in", *spelling)
    assert code == 0 and seen == ["o"] and out.startswith("wrote o"), err


@pytest.mark.parametrize("flag", ["--model", "--base"])
def test_lora_merge_takes_model_and_the_older_base(monkeypatch, capsys, flag):
    from nemo_minitron.peft import adapter_io

    seen = []
    monkeypatch.setattr(adapter_io, "merge_lora", lambda *a, **kw: seen.append(a) or a[2])
    code, out, err = run(capsys, "lora", "merge", flag, "b.nemo", "--adapter", "ad", "--out", "m")
    assert code == 0 and seen == [("b.nemo", "ad", "m")] and out == "wrote m\n", err
