"""`nemo-minitron generate` / `eval-ppl`, recipes/generate.py and conf/generate/*.yaml: strict input
checks in-process (before any process group), one real `python` run and one real `torchrun` run."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from nemo_minitron.cli import main
from nemo_minitron.errors import ConfigError
from nemo_minitron.inference.job import GenerateJobConfig
from nemo_minitron.config.recipe import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precedence_defaults_yaml_overrides(tmp_path):
    conf = tmp_path / "g.yaml"
    conf.write_text('max_new_tokens: 5\ntemperature: 0.5\nstop: ["\\n"]\n')
    job = load_config(GenerateJobConfig, str(conf), ["temperature=1", "top_k=3", "prompt=a: b"])
    assert (job.max_new_tokens, job.temperature, job.top_k, job.stop, job.prompt, job.top_p) == \
        (5, 1.0, 3, ["\n"], "a: b", 1.0)
    with pytest.raises(ConfigError, match="unknown config key 'topk' for GenerateJobConfig"):
        load_config(GenerateJobConfig, str(conf), ["topk=3"])
    with pytest.raises(ConfigError, match="max_new_tokens='many' must be of type int"):
        load_config(GenerateJobConfig, None, ["max_new_tokens=many"])


@pytest.mark.parametrize("name", ["tiny", "minitron_4b_width"])
def test_conf_files_start_with_their_command_and_load(name):
    path = os.path.join(ROOT, "nemo_minitron", "conf", "generate", f"{name}.yaml")
    first = open(path).readline()
    assert first.startswith("# ") and re.search(rf"recipes/generate.py --config {name}\b", first)
    job = load_config(GenerateJobConfig, path)
    assert job.model and (job.prompt or job.prompts)


@pytest.mark.parametrize("extra, message", [
    (["bogus=1"], "unknown config key 'bogus' for GenerateJobConfig"),
    (["top_p=2"], "top_p=2.0 must be in (0, 1]"),
    (["tp=3"], "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    (["--prompts", "x.jsonl"], "give exactly one of prompt=TEXT or prompts=FILE.jsonl"),
    (["max_new_tokens=300"], "exceeds the model's max_position_embeddings=256"),
])
def test_bad_generate_input_is_one_line_exit_2(capsys, tiny_hf_dir, extra, message):
    if "max_position" in message:  # needs the prompt tokenized (HF tokenizer)
        pytest.importorskip("transformers")
    code = main(["generate", "--model", tiny_hf_dir, "--prompt", "hi"] + extra)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_files_are_one_line_exit_2(capsys, tmp_path, tiny_hf_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    good = tmp_path / "doc.txt"
    good.write_text("A document.\n")
    cases = [(["generate", "--model", str(tmp_path), "--prompt", "x"], "no config.json"),
             (["generate", "--model", tiny_hf_dir, "--prompts", str(bad), "--out", "o.jsonl"],
              "p.jsonl:2: missing or non-string field(s) 'prompt'"),
             (["generate", "--model", tiny_hf_dir, "--prompts", str(bad)], "needs out=FILE.jsonl"),
             (["eval-ppl", "--model", tiny_hf_dir, "--data", str(tmp_path / "none.txt"), "window=64",
               "stride=32"],
              "file not found"),
             (["eval-ppl", "--model", tiny_hf_dir, "--data", str(bad), "window=64", "stride=32"],
              "p.jsonl:1: missing or non-string field(s) 'text'"),  # before any model is read
             (["eval-ppl", "--model", tiny_hf_dir, "--data", str(good), "window=512"],
              "window=512 exceeds the model's max_position_embeddings=256")]
    for argv, message in cases:
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, (argv, err)


def _hf_reference(hf_dir, prompt, new, document):
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        doc = torch.tensor([tok(document)["input_ids"]])
        ppl = math.exp(model(doc, labels=doc).loss.item())
    return text, ppl


def test_python_and_torchrun_runs_match_transformers(tiny_hf_dir, tmp_path):
    pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    prompt, document = topics["while"][:120], topics["pass"][:600]
    text, ppl = _hf_reference(tiny_hf_dir, prompt, 10, document)
    env = dict(os.environ, PYTHONPATH=ROOT)
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    # the python run reads a .nemo of the same (bf16) weights: the reference stays transformers
    nemo = hf_to_nemo(tiny_hf_dir, str(tmp_path / "tiny.nemo"), progress=False)
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "generate", "--model",
                           nemo, "--prompt", prompt, "--greedy", "--max-new-tokens", "10",
                           "dtype=float32"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == text + "\n"  # only the completion, exactly

    data = tmp_path / "doc.jsonl"
    data.write_text(json.dumps({"text": document}) + "\n")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "nemo_minitron.cli",
                           "eval-ppl", "--model", tiny_hf_dir, "--data", str(data), "tp=2",
                           "dtype=float32", "window=256", "stride=256"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1  # rank 0 only
    result = json.loads(lines[0])
    assert result["ppl"] == pytest.approx(ppl, rel=1e-4)
