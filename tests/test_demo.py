"""``nemo-minitron demo``: the quick pipeline end to end as a user runs it (a fresh process), its
numbers checked against transformers on its own outputs; the driver's workdir safety and
stage-failure reporting (fast, both tiers).

The end-to-end test runs in the default suite (marked slow): measured 140 s on 2 cores shared with
other jobs at load average 6-7 (308 s at load ~15), for about 76 s of CPU time, so roughly
1-1.5 min on an idle machine. It skips without transformers (the NeMo 24.05 tier), which the demo
needs for text prompts, text data and verify; there the demo's up-front refusal is tested instead.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nemo_minitron.cli import main
from nemo_minitron.demo import (MARKER, PPL_STRIDE, PPL_WINDOW, PROMPT, STAGES, DemoError,
                                DemoOptions, Stage, StageResult, run_demo, transformers_missing)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(stdout: str) -> dict:
    """stage -> (seconds, key numbers, output) from the printed summary table."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines)
                if re.match(r"stage\s+seconds\s+key numbers", line))
    starts = [lines[head].index(c) for c in ("seconds", "key numbers", "output")]
    rows = {}
    for line in lines[head + 2:]:
        if line.startswith("total "):
            break
        name = line.split()[0]
        rows[name] = (float(line[:starts[1]].split()[1]),
                      line[starts[1]:starts[2]].strip(), line[starts[2]:].strip())
    return rows


def _number(text: str, label: str) -> float:
    return float(re.search(re.escape(label) + r" ([-+0-9.e,]+)", text).group(1).replace(",", ""))


def _hf_ppl(model, ids):
    """Sliding-window NLL with transformers: the same windows, an independent forward."""
    from nemo_minitron.inference.score import sliding_windows

    nll, count = 0.0, 0
    for begin, end, first in sliding_windows(len(ids), PPL_WINDOW, PPL_STRIDE):
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0].float()
        targets = torch.tensor(ids[first:end])
        nll += torch.nn.functional.cross_entropy(logits[first - begin - 1:end - begin - 1], targets,
                                                 reduction="sum").item()
        count += len(targets)
    return torch.tensor(nll / count).exp().item(), count


@pytest.mark.slow
@pytest.mark.hf
def test_quick_demo_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nemo_minitron.config.presets import get_preset

    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "demo", "--workdir",
                           str(workdir), "--quick"], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _table(proc.stdout)
    assert list(rows) == [s.name for s in STAGES]
    for name, (seconds, numbers, _) in rows.items():
        # seconds as printed (one decimal: a fast stage such as export can show 0.0)
        assert seconds >= 0 and re.search(r"\d", numbers), (name, numbers)
    summary = json.loads((workdir / "summary.json").read_text())
    assert [r["status"] for r in summary["stages"]] == ["ok"] * len(STAGES)
    assert (workdir / MARKER).is_file() and not list(workdir.glob("*.ckpt"))  # no --keep

    # the exported student loads in transformers with the 4B-Width-shaped tiny architecture
    student_dir, teacher_dir = workdir / "student_hf", workdir / "teacher_hf"
    assert rows["export"][2] == "demo/student_hf"
    target = get_preset("tiny_minitron_width")
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    c = student.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim) == (
        target.hidden_size, target.ffn_hidden_size, target.num_layers,
        target.num_attention_heads, target.num_query_groups, target.head_dim)
    assert sum(p.numel() for p in student.parameters()) == _number(rows["prune"][1], "after")
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)

    # greedy completion: transformers on the teacher HF checkpoint (the demo generated from .nemo)
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = teacher.generate(**ids, max_new_tokens=8, do_sample=False,
                               pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert f"completion {' '.join(text.split())[:40]!r}" in rows["generate"][1]
    assert _number(rows["generate"][1], "tokens") == 8

    # perplexities: transformers on the same document and windows (table: 4 significant digits)
    doc_ids = tok((workdir / "pydoc_while.txt").read_text())["input_ids"]
    for model, label in ((teacher, "teacher ppl"), (student, "student ppl")):
        ppl, count = _hf_ppl(model, doc_ids)
        assert _number(rows["perplexity"][1], label) == pytest.approx(ppl, rel=1e-3)
    assert _number(rows["perplexity"][1], "tokens") == count

    numbers = rows["distill"][1]
    assert _number(numbers, "after") < _number(numbers, "held-out KL before")
    assert _number(rows["verify"][1], "max |dlogit|") <= 1e-3


# ---- the driver (fast; no transformers needed) -------------------------------------------------
def _stage(name, fn):
    return Stage(name, fn, f"test stage {name}")


def test_refuses_a_directory_that_is_not_a_demo_dir(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main(["demo", "--workdir", str(user), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a previous demo directory" in err and str(user) in err
    assert sorted(os.listdir(user)) == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "keep me"

    (tmp_path / "file").write_text("x")
    assert main(["demo", "--workdir", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["demo", "--workdir", str(tmp_path / "new"), "--steps", "0"]) == 2
    assert "--steps 0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not transformers_missing(), reason="transformers >= 4.45 is installed")
def test_without_transformers_the_demo_stops_before_any_work(tmp_path, capsys):
    """The NeMo 24.05 tier (no transformers; the container has 4.40): one clear line, no output."""
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "the demo needs transformers >= 4.45" in err and "pip install" in err
    assert not (tmp_path / "w").exists()


def test_replaces_only_a_previous_demo_dir(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / MARKER).write_text("")
    (work / "old_output").mkdir()

    def write(ctx):
        path = ctx.path("made.txt")
        with open(path, "w") as f:
            f.write("1")
        return StageResult({"value": "1"}, [path])

    rows = run_demo(DemoOptions(workdir=str(work)), stages=[_stage("write", write)])
    assert sorted(os.listdir(work)) == sorted([MARKER, "made.txt", "summary.json"])
    assert rows[0]["status"] == "ok" and rows[0]["numbers"] == {"value": "1"}
    assert "value 1" in capsys.readouterr().out


def test_a_failing_stage_is_named_and_stops_the_demo(tmp_path, capsys):
    ran = []

    def ok(ctx):
        ran.append("ok")
        return StageResult({"n": "3"})

    def broken(ctx):
        ran.append("broken")
        raise RuntimeError("boom")

    def never(ctx):
        ran.append("never")
        return StageResult({})

    with pytest.raises(DemoError, match="demo stage 'broken' failed: boom"):
        run_demo(DemoOptions(workdir=str(tmp_path / "w")),
                 stages=[_stage("ok", ok), _stage("broken", broken), _stage("never", never)])
    assert ran == ["ok", "broken"]
    out = capsys.readouterr().out
    rows = _table(out)
    assert list(rows) == ["ok", "broken"] and rows["broken"][1] == "FAILED"
    assert "[demo 2/3] broken: FAILED in" in out
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert [r["status"] for r in summary["stages"]] == ["ok", "FAILED"]
