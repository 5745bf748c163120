"""Every error a user can cause, in every command: one line ``error: ...``, exit status 2, before
any expensive work (no process group, no .nemo conversion, no model), nothing written, inputs intact.

Each row of ERRORS is (id, argv, setup of the bad input, fragment of the message). The argv holds
placeholders: {hf} / {hf2} (tiny HF checkpoints, same shape, other weights), {nemo} (the tiny
.nemo), {tmp} (the row's own directory), {ro} (a directory nobody may write in), {port} (a port
another socket listens on). The rows run in this process (``nemo_minitron.cli.main``): the errors
must come before anything that would need a fresh one.
"""
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess

import pytest

from nemo_minitron.cli import load_recipe, main
from tests.helpers import run_ranks
from tests.train_helpers import preimport  # noqa: F401  (warm forked workers, quiet imports)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SFT = os.path.join(ROOT, "nemo_minitron", "conf", "finetune", "tiny_sft.yaml")
QA = [("What is the capital of France?", "Paris."), ("Name a primary color.", "Blue."),
      ("2 + 3 =", "5"), ("Opposite of hot?", "Cold.")]


# ---- bad inputs ------------------------------------------------------------------------------
def _sft(tmp, name="train.jsonl"):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.writelines(json.dumps({"input": q, "output": a}) + "\n" for q, a in QA)
    return path


def _not_utf8(tmp):
    """train.jsonl with a Latin-1 line 2; bad.txt with a Latin-1 byte."""
    with open(os.path.join(tmp, "train.jsonl"), "wb") as f:
        f.write(b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "x"}\n')
    with open(os.path.join(tmp, "bad.txt"), "wb") as f:
        f.write(b"Some text.\nna\xefve\n")


def _good_data(tmp):
    _sft(tmp)
    with open(os.path.join(tmp, "good.txt"), "w") as f:
        f.write("Some text.\n")


def _mkdir(*names):
    def setup(tmp):
        _good_data(tmp)
        for name in names:
            os.makedirs(os.path.join(tmp, name))
    return setup


def _fake_model(tmp, name="base"):
    """A directory that is an input (only its existence matters to the path checks)."""
    os.makedirs(os.path.join(tmp, name))
    with open(os.path.join(tmp, name, "config.json"), "w") as f:
        f.write("{}\n")


def _base_and_data(tmp):
    _good_data(tmp)
    _fake_model(tmp)


def _data_inside_out(tmp):
    os.makedirs(os.path.join(tmp, "o"))
    _sft(os.path.join(tmp, "o"))


def _nemo_copy(tmp, nemo):
    shutil.copy(nemo, os.path.join(tmp, "same.nemo"))


def _prompts(tmp):
    with open(os.path.join(tmp, "p.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "Hello"}) + "\n")


def _corpus_named_like_output(tmp):
    with open(os.path.join(tmp, "c_text_document.bin"), "w") as f:
        f.write(json.dumps({"text": "Hello"}) + "\n")


def _adapter_dir(tmp):
    os.makedirs(os.path.join(tmp, "adapter"))


FT = ["finetune", "--model", "{hf}", "--data", "{tmp}/train.jsonl"]
DI = ["distill", "--teacher", "{hf}", "--student", "{hf2}", "--data", "{tmp}/good.txt"]
PR = ["prune", "--model", "{hf}", "calib_samples=2", "seq_length=16"]

ERRORS = [
    # finetune: outputs before training, the optimizer's values, the data's encoding
    ("finetune-out-exists", FT + ["--out", "{tmp}/o"], _mkdir("o"), "exists; pass --overwrite"),
    ("finetune-lora-adapter-exists", FT + ["--peft", "lora", "--out", "{tmp}/o.nemo"],
     _mkdir("o.lora"), "exists; pass --overwrite"),
    ("finetune-out-is-model", ["finetune", "--model", "{tmp}/base", "--data", "{tmp}/train.jsonl",
                               "--out", "{tmp}/base", "--overwrite"], _base_and_data,
     "--out {tmp}/base is the input --model"),
    ("finetune-out-inside-model", ["finetune", "--model", "{tmp}/base", "--data",
                                   "{tmp}/train.jsonl", "--out", "{tmp}/base/sft"], _base_and_data,
     "is inside the input --model"),
    ("finetune-out-contains-data", ["finetune", "--model", "{hf}", "--data", "{tmp}/o/train.jsonl",
                                    "--out", "{tmp}/o", "--overwrite"], _data_inside_out,
     "contains the input --data"),
    ("finetune-readonly-dir", FT + ["--out", "{ro}/o"], _good_data, "cannot write in"),
    ("finetune-out-nemo-is-dir", FT + ["--out", "{tmp}/o.nemo", "--overwrite"], _mkdir("o.nemo"),
     "is a directory; the output is a file"),
    ("finetune-lr-negative", FT + ["--out", "{tmp}/o", "optim.lr=-1"], _good_data,
     "optim.lr=-1.0 must be positive"),
    ("finetune-not-utf8", FT + ["--out", "{tmp}/o"], _not_utf8, "train.jsonl:2: not UTF-8"),
    ("finetune-lora-not-utf8", FT + ["--peft", "lora", "--out", "{tmp}/o"], _not_utf8,
     "train.jsonl:2: not UTF-8"),
    # distill
    ("distill-not-utf8", ["distill", "--teacher", "{hf}", "--student", "{hf2}", "--data",
                          "{tmp}/bad.txt", "--out", "{tmp}/o"], _not_utf8, "bad.txt:2: not UTF-8"),
    ("distill-out-is-teacher", ["distill", "--teacher", "{tmp}/base", "--student", "{hf2}",
                                "--data", "{tmp}/good.txt", "--out", "{tmp}/base", "--overwrite"],
     _base_and_data, "is the input --teacher"),
    ("distill-out-exists", DI + ["--out", "{tmp}/o"], _mkdir("o"), "exists; pass --overwrite"),
    ("finetune-attention-backend", FT + ["--out", "{tmp}/o", "model.attention_backend=flash"],
     _good_data, "model.attention_backend='flash': choose one of auto, sdpa, megatron"),
    ("distill-attention-backend", DI + ["--out", "{tmp}/o", "model.attention_backend=flash"],
     _good_data, "model.attention_backend='flash': choose one of auto, sdpa, megatron"),
    ("distill-lr-negative", DI + ["--out", "{tmp}/o", "optim.lr=-1"], _good_data,
     "optim.lr=-1.0 must be positive"),
    ("distill-readonly-dir", DI + ["--out", "{ro}/o"], _good_data, "cannot write in"),
    # prune: a bad target of a .nemo teacher before the teacher is converted
    ("prune-nemo-bad-target", ["prune", "--model", "{nemo}", "--out", "{tmp}/s",
                               "hidden_size=9999"], None, "hidden_size=9999 is larger than the teacher's"),
    ("prune-out-is-model", ["prune", "--model", "{tmp}/base", "--out", "{tmp}/base",
                            "overwrite=true"], _base_and_data, "is the input model"),
    ("prune-readonly-dir", PR + ["--out", "{ro}/s"], None, "cannot write in"),
    ("prune-not-utf8", PR + ["--out", "{tmp}/s", "--data", "{tmp}/bad.txt"], _not_utf8,
     "bad.txt:2: not UTF-8"),
    # convert: never over an input, outputs checked first
    ("nemo-to-hf-same-file", ["convert", "nemo-to-hf", "{tmp}/same.nemo", "{tmp}/same.nemo",
                              "--overwrite"], _nemo_copy, "is the input"),
    ("nemo-to-hf-readonly-dir", ["convert", "nemo-to-hf", "{nemo}", "{ro}/hf"], None,
     "cannot write in"),
    ("hf-to-nemo-out-inside-input", ["convert", "hf-to-nemo", "{tmp}/base", "{tmp}/base/x.nemo"],
     _base_and_data, "is inside the input"),
    ("hf-to-nemo-out-is-dir", ["convert", "hf-to-nemo", "{hf}", "{tmp}/o.nemo", "--overwrite"],
     _mkdir("o.nemo"), "is a directory; the output is a file"),
    ("hf-to-nemo-readonly-dir", ["convert", "hf-to-nemo", "{hf}", "{ro}/x.nemo"], None,
     "cannot write in"),
    # lora
    ("lora-merge-out-is-base", ["lora", "merge", "--base", "{tmp}/base", "--adapter",
                                "{tmp}/adapter", "--out", "{tmp}/base", "--overwrite"],
     lambda tmp: (_fake_model(tmp), _adapter_dir(tmp)), "is the input --model"),
    ("lora-export-out-inside-adapter", ["lora", "export-peft", "--adapter", "{tmp}/adapter",
                                        "--out", "{tmp}/adapter/peft"], _adapter_dir,
     "is inside the input --adapter"),
    # preprocess
    ("preprocess-out-is-input", ["preprocess", "--input", "{tmp}/c_text_document.bin",
                                 "--output-prefix", "{tmp}/c", "--overwrite"],
     _corpus_named_like_output, "is the input --input"),
    ("preprocess-not-utf8", ["preprocess", "--input", "{tmp}/train.jsonl", "--output-prefix",
                             "{tmp}/c", "--json-keys", "input"], _not_utf8,
     "train.jsonl:2: not UTF-8"),
    # generate / eval-ppl / serve
    ("generate-out-is-prompts", ["generate", "--model", "{hf}", "--prompts", "{tmp}/p.jsonl",
                                 "--out", "{tmp}/p.jsonl"], _prompts, "is the input prompts"),
    ("generate-out-is-dir", ["generate", "--model", "{hf}", "--prompts", "{tmp}/p.jsonl", "--out",
                             "{tmp}/o"], lambda tmp: (_prompts(tmp), _mkdir("o")(tmp)),
     "is a directory; the output is a file"),
    ("eval-ppl-not-utf8", ["eval-ppl", "--model", "{nemo}", "--data", "{tmp}/bad.txt"], _not_utf8,
     "bad.txt:2: not UTF-8"),
    ("serve-port-in-use", ["serve", "--model", "{nemo}", "--port", "{port}"], None,
     "is in use"),
    ("serve-seed-beyond-64-bits", ["serve", "--model", "{hf}", "--port", "0",
                                   f"seed={1 << 64}"], None, "must be an integer in [0, 2**64)"),
]


# ---- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_hf_dir):
    """{hf}, {hf2} (same shape, other weights) and {nemo} (the tiny .nemo of {hf})."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    root = tmp_path_factory.mktemp("user_errors")
    hf2 = write_tiny_hf_checkpoint(str(root / "hf2"), preset="tiny_llama31", seed=5)
    nemo = hf_to_nemo(tiny_hf_dir, str(root / "tiny.nemo"), progress=False)
    return {"hf": tiny_hf_dir, "hf2": hf2, "nemo": nemo}


def _tree(path):
    """{relative path: sha256 or 'dir'} of everything under ``path``."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = "dir"
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _stat_tree(path):
    """Cheaper for the shared models: sizes and modification times."""
    if os.path.isfile(path):
        st = os.stat(path)
        return {".": (st.st_size, st.st_mtime_ns)}
    return {os.path.relpath(os.path.join(r, n), path): (os.stat(os.path.join(r, n)).st_size,
                                                         os.stat(os.path.join(r, n)).st_mtime_ns)
            for r, _, files in os.walk(path) for n in files}


@contextlib.contextmanager
def _read_only_dir(path):
    """A directory nobody may create entries in: chmod for a user; for root (whom permission bits
    do not stop) the immutable attribute."""
    os.makedirs(path)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, 0o755)
        return
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        pytest.skip("running as root and chattr +i is unavailable: no read-only directory")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


@contextlib.contextmanager
def _port_in_use():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _forbid(*_args, **_kwargs):
    raise AssertionError("expensive work started before the input error was found")


def _forbid_weight_reads(monkeypatch):
    """Reading a model's weights fails the test (a job's native reads, and any .nemo weights
    reader: no conversion either); its config and tokenizer (small files) may be read."""
    import nemo_minitron.convert.nemo_to_hf as nemo_to_hf
    from nemo_minitron.model.source import ModelSource

    for name in ("load_into", "hf_getter", "full_tensors"):
        monkeypatch.setattr(ModelSource, name, _forbid)
    monkeypatch.setattr(nemo_to_hf, "weights_reader", _forbid)


def _one_line_error(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- the table -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,setup,fragment", [r[1:] for r in ERRORS], ids=[r[0] for r in ERRORS])
def test_user_error(argv, setup, fragment, models, tmp_path, capsys, monkeypatch):
    import nemo_minitron.dist as dist
    import nemo_minitron.inference.job as job

    # anything expensive fails the test: a process group, reading weights, loading a model
    monkeypatch.setattr(dist, "init_megatron", _forbid)
    _forbid_weight_reads(monkeypatch)
    monkeypatch.setattr(job, "setup", _forbid)
    tmp = str(tmp_path / "row")
    os.makedirs(tmp)
    if setup is not None:
        setup(tmp) if setup is not _nemo_copy else setup(tmp, models["nemo"])
    shared = {k: _stat_tree(v) for k, v in models.items()}
    with contextlib.ExitStack() as stack:
        values = dict(models, tmp=tmp, ro=os.path.join(tmp, "ro"), port="0")
        if "{ro}" in " ".join(argv):
            stack.enter_context(_read_only_dir(values["ro"]))
        if "{port}" in " ".join(argv):
            values["port"] = str(stack.enter_context(_port_in_use()))
        before = _tree(tmp)
        line = _one_line_error(capsys, [a.format(**values) for a in argv])
        assert fragment.format(**values) in line, line
        assert _tree(tmp) == before  # nothing written, no input touched, no temporary left
    assert {k: _stat_tree(v) for k, v in models.items()} == shared


def test_serve_answers_400_to_a_seed_beyond_64_bits():
    from nemo_minitron.config import get_preset
    from nemo_minitron.inference.serve import RequestError, parse_request

    cfg = get_preset("tiny_llama31")
    for seed in (1 << 64, -1, 1.5, "7"):
        with pytest.raises(RequestError) as e:
            parse_request(json.dumps({"prompt": [1, 5], "seed": seed}).encode(), cfg, None)
        assert e.value.status == 400 and "seed=" in str(e.value)
    ids, params = parse_request(json.dumps({"prompt": [1, 5], "seed": (1 << 64) - 1}).encode(),
                                cfg, None)
    assert params.seed == (1 << 64) - 1


# ---- resume: the checkpoint directory remembers what the run started from ---------------------
def _run_finetune(rank, argv):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # the recipe sets up Megatron itself
    return load_recipe("finetune").main(argv)


@pytest.mark.megatron
def test_resume_refuses_other_inputs(models, tmp_path, capsys, monkeypatch):
    """A real 1-step finetune, then reruns into the same --out (and so the same .ckpt): another
    base model of the same shape, one of another shape, other data and another sequence length
    all refuse in one line; the same inputs resume; trainer.resume=false starts over."""
    pytest.importorskip("tokenizers", reason="SFT data needs the tokenizers library")
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    data = _sft(str(tmp_path))
    out = str(tmp_path / "out")
    argv = ["--config", TINY_SFT, "--data", data, "--out", out, "trainer.max_steps=1",
            "trainer.ckpt_every_n_steps=0"]
    assert run_ranks(lambda r: _run_finetune(r, ["--model", models["hf"]] + argv)) == [0]
    ckpt = out + ".ckpt"
    assert sorted(e for e in os.listdir(ckpt) if e != "logs") == ["latest", "run.json",
                                                                   "step_000001"]
    recorded = json.load(open(os.path.join(ckpt, "run.json")))
    assert recorded["recipe"] == "finetune"
    assert recorded["inputs"]["--model"]["path"] == os.path.abspath(models["hf"])
    assert recorded["inputs"]["--model"]["fingerprint"].startswith("sha256:")

    other_shape = write_tiny_hf_checkpoint(str(tmp_path / "width"), preset="tiny_minitron_width")
    import nemo_minitron.dist as dist

    state = _stat_tree(str(tmp_path))
    with monkeypatch.context() as m:
        m.setattr(dist, "init_megatron", _forbid)  # the refusals come before any process group
        for model, extra, fragment in [
                (models["hf2"], [], f"--model was {os.path.abspath(models['hf'])}, now "
                                    f"{os.path.abspath(models['hf2'])} (other contents)"),
                (other_shape, [], "(other contents)"),
                (models["hf"], ["data.seq_length=32"], "data.seq_length was 64, now 32"),
                (models["hf"], ["--peft", "lora"], "peft was none, now lora")]:
            line = _one_line_error(capsys, ["finetune", "--model", model, "--overwrite"] + argv
                                   + extra)
            assert fragment in line and "trainer.resume=false" in line and "--out" in line, line
            assert _stat_tree(str(tmp_path)) == state  # the old run and its output untouched

    # the same inputs (copied elsewhere: contents, not paths) resume: 2 steps from step 1
    moved = str(tmp_path / "moved")
    shutil.copytree(models["hf"], moved)
    argv2 = argv[:-2] + ["trainer.max_steps=2", "trainer.ckpt_every_n_steps=0"]
    assert run_ranks(lambda r: _run_finetune(r, ["--model", moved, "--overwrite"] + argv2)) == [0]
    assert sorted(e for e in os.listdir(ckpt) if e.startswith("step_")) == ["step_000001",
                                                                         "step_000002"]
    # trainer.resume=false starts over with the other base: its steps replace the old ones
    assert run_ranks(lambda r: _run_finetune(r, ["--model", models["hf2"], "--overwrite"] + argv
                                             + ["trainer.resume=false"])) == [0]
    assert sorted(e for e in os.listdir(ckpt) if e.startswith("step_")) == ["step_000001"]
    now = json.load(open(os.path.join(ckpt, "run.json")))
    assert now["inputs"]["--model"]["path"] == os.path.abspath(models["hf2"])


def _fake_checkpoint(recipe_name, argv, ckpt_dir):
    """The checkpoint directory a run of ``argv`` would have left (its run.json and one step),
    without training: what the check reads."""
    from nemo_minitron.train.resume import write_identity

    recipe = load_recipe(recipe_name)
    args = dict(zip(argv[::2], argv[1::2]))
    values = {"teacher": {"restore_from_path": args.get("--teacher")},
              "model": {"restore_from_path": args.get("--model", args.get("--student"))},
              "data": {"train_ds": {"file_path": args["--data"]}}, "out": args["--out"],
              "peft": args.get("--peft")}
    if recipe_name == "finetune":
        values.pop("teacher")
    from nemo_minitron.config.recipe import without_none

    cfg = recipe.load_recipe_config(None, [], values=without_none(values))
    os.makedirs(os.path.join(ckpt_dir, "step_000003"))
    with open(os.path.join(ckpt_dir, "latest"), "w") as f:
        f.write("step_000003\n")
    write_identity(ckpt_dir, recipe.identity(cfg))


@pytest.mark.parametrize("case", ["lora-base", "distill-teacher", "distill-student"])
def test_resume_identity_lora_and_distill(case, models, tmp_path, capsys, monkeypatch):
    """LoRA (whose checkpoints hold only the adapters: the base is read again) and distillation
    (teacher and student) refuse another input the same way, before anything is built."""
    import nemo_minitron.dist as dist

    monkeypatch.setattr(dist, "init_megatron", _forbid)
    _forbid_weight_reads(monkeypatch)
    data = _sft(str(tmp_path))
    out = str(tmp_path / "out")
    if case == "lora-base":
        first = ["--model", models["hf"], "--data", data, "--out", out, "--peft", "lora"]
        rerun = ["finetune", "--model", models["nemo"], "--data", data, "--out", out, "--peft",
                 "lora"]
        recipe, fragment = "finetune", "--model was"
    else:
        first = ["--teacher", models["hf"], "--student", models["hf2"], "--data", data,
                 "--out", out]
        rerun = ["distill"] + first
        swap = 2 if case == "distill-teacher" else 4
        rerun[swap] = models["nemo"] if case == "distill-teacher" else models["hf"]
        recipe = "distill"
        fragment = "--teacher was" if case == "distill-teacher" else "--student was"
    _fake_checkpoint(recipe, first, out + ".ckpt")
    line = _one_line_error(capsys, rerun)
    assert fragment in line and "trainer.resume=false" in line, line
