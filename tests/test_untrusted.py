"""Hostile checkpoints: a .nemo whose pickles name ``os.system`` runs nothing, in any command.

The corpus is built from a real tiny .nemo (torch_dist and legacy), each file with one pickle
replaced by one that would create a marker file when unpickled by an unrestricted reader:

- ``.metadata`` that is the bare payload; a real DCP ``Metadata`` carrying it in ``planner_data``
- ``common.pt`` (Megatron reads it with torch.load's default: unrestricted before torch 2.6)
- a byte object (``_extra_state``) inside a ``.distcp`` (torch DCP loads those with
  ``weights_only=False`` under Megatron's ``dist_checkpointing.load``)
- a legacy ``model_weights.ckpt`` and a legacy TP=2 rank file

Every command that opens a model is run on each (in a forked child of this process: the same
code as the program, ~1 s instead of ~8 s of imports): exit status 2, one ``error:`` line that
says the file was refused, and no marker. The payload itself is checked to be live: an
unrestricted ``pickle.load`` of it does create the marker (so the test can fail).
"""
import json
import os
import pickle
import shutil
import sys
import tarfile
import types

import pytest
import torch

pytestmark = pytest.mark.megatron

HAS_TRANSFORMERS = __import__("importlib").util.find_spec("transformers") is not None


class _Payload:
    """Unpickled by an unrestricted reader, runs ``touch MARKER`` through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A tiny HF checkpoint and its .nemo files, extracted: torch_dist, legacy, legacy TP=2."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    root = tmp_path_factory.mktemp("clean")
    hf = write_tiny_hf_checkpoint(str(root / "hf"), preset="tiny_llama31", seed=0,
                                  dtype="float32")
    trees = {}
    for name, kw in {"torch_dist": {}, "legacy": dict(fmt="legacy"),
                     "legacy_tp2": dict(fmt="legacy", tp=2)}.items():
        nemo = hf_to_nemo(hf, str(root / f"{name}.nemo"), progress=False, dtype="fp32", **kw)
        with tarfile.open(nemo) as tar:
            tar.extractall(root / name, filter="data")
        trees[name] = str(root / name)
    return types.SimpleNamespace(hf=hf, trees=trees, root=root)


def _metadata_with(weights, change):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(weights).read_metadata()  # our own clean file: torch's reader is fine
    change(md)
    with open(os.path.join(weights, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _poison_object(weights, payload):
    """One ``_extra_state`` byte object re-pointed at a data file holding the payload."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    path = os.path.join(weights, "__evil_0.distcp")
    torch.save(payload, path)

    def change(md):
        index = next(i for i in md.storage_data if "_extra_state" in i.fqn)
        md.storage_data[index] = _StorageInfo(relative_path="__evil_0.distcp", offset=0,
                                              length=os.path.getsize(path))
    _metadata_with(weights, change)


def _poison(kind, tree, payload):
    weights = os.path.join(tree, "model_weights")
    if kind == "metadata_bare":
        with open(os.path.join(weights, ".metadata"), "wb") as f:
            pickle.dump(payload, f)
    elif kind == "metadata_planner_data":
        _metadata_with(weights, lambda md: setattr(md, "planner_data", {"x": payload}))
    elif kind == "common_pt":
        torch.save({"sharded_backend": payload}, os.path.join(weights, "common.pt"))
    elif kind == "byte_object":
        _poison_object(weights, payload)
    elif kind == "legacy_ckpt":
        torch.save({"model.decoder.final_layernorm.weight": payload},
                   os.path.join(tree, "model_weights.ckpt"))
    elif kind == "legacy_rank_file":
        torch.save({"x": payload}, os.path.join(tree, "mp_rank_01", "model_weights.ckpt"))
    else:
        raise ValueError(kind)


SOURCES = {"metadata_bare": "torch_dist", "metadata_planner_data": "torch_dist",
           "common_pt": "torch_dist", "byte_object": "torch_dist", "legacy_ckpt": "legacy",
           "legacy_rank_file": "legacy_tp2"}


@pytest.fixture(scope="module")
def corpus(clean):
    """kind -> (hostile .nemo tar, the marker file its payload would create)."""
    out = {}
    for kind, source in SOURCES.items():
        tree = str(clean.root / f"hostile_{kind}")
        shutil.copytree(clean.trees[source], tree)
        marker = str(clean.root / f"PWNED_{kind}")
        _poison(kind, tree, _Payload(marker))
        nemo = str(clean.root / f"hostile_{kind}.nemo")
        with tarfile.open(nemo, "w") as tar:
            for entry in sorted(os.listdir(tree)):
                tar.add(os.path.join(tree, entry), arcname=f"./{entry}")
        out[kind] = (nemo, marker)
    return out


def test_payload_is_live(tmp_path):
    """The payload does run under an unrestricted unpickler (else every check below is empty)."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Payload(str(marker))))
    assert marker.exists()


@pytest.fixture(scope="module")
def inputs(clean):
    """Valid everything-else for the commands: SFT data, prompts, a LoRA adapter of this shape."""
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.peft import lora
    from nemo_minitron.peft.adapter_io import adapter_meta, save_adapter

    root = clean.root / "inputs"
    root.mkdir()
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"input": f"Q{i}?", "output": f" A{i}."}) + "\n"
                           for i in range(16)))
    text = root / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    cfg = read_hf_config(clean.hf)
    spec = types.SimpleNamespace(target_modules=["linear_qkv"], rank=2, alpha=4.0, dropout=0.0)
    meta = adapter_meta(cfg, spec)
    tensors = {}
    for layer in range(cfg.num_layers):
        out, inp = lora.full_shape(cfg, "linear_qkv")
        tensors[lora.adapter_key(layer, "linear_qkv", "a")] = torch.zeros(2, inp)
        tensors[lora.adapter_key(layer, "linear_qkv", "b")] = torch.zeros(out, 2)
    adapter = save_adapter(tensors, meta, str(root / "adapter"))
    return types.SimpleNamespace(sft=str(sft), text=str(text), adapter=adapter, hf=clean.hf,
                                 root=root)


def _commands(nemo, inp, out):
    """Every command that opens a model, with ``nemo`` as that model and valid other inputs."""
    cmds = {
        "inspect": ["inspect", nemo],
        "nemo-to-hf": ["convert", "nemo-to-hf", nemo, out],
        "prune": ["prune", "--config", "conf/prune/tiny.yaml", "--model", nemo, "--out", out],
        "finetune": ["finetune", "--config", "conf/finetune/tiny_sft.yaml", "--model", nemo,
                     "--data", inp.sft, "--out", out, "trainer.max_steps=1"],
        "distill-teacher": ["distill", "--config", "conf/distill/tiny.yaml", "--teacher", nemo,
                            "--student", inp.hf, "--data", "pydoc", "--out", out,
                            "trainer.max_steps=1"],
        "distill-student": ["distill", "--config", "conf/distill/tiny.yaml", "--teacher", inp.hf,
                            "--student", nemo, "--data", "pydoc", "--out", out,
                            "trainer.max_steps=1"],
        "lora-merge": ["lora", "merge", "--base", nemo, "--adapter", inp.adapter, "--out", out],
    }
    if HAS_TRANSFORMERS:  # text jobs tokenize first (without transformers they stop there,
        # before any weight); verify's reference is transformers
        cmds.update({
            "generate": ["generate", "--model", nemo, "--prompt", "Hello", "--max-new-tokens",
                         "2"],
            "eval-ppl": ["eval-ppl", "--model", nemo, "--data", inp.text, "window=64",
                         "stride=32"],
            "serve": ["serve", "--model", nemo, "--port", "0"],
            "verify": ["verify", inp.hf, nemo]})
    return cmds


def _run_forked(argv, log, cwd, timeout=120):
    """``nemo_minitron.cli.main(argv)`` in a forked child: (exit status, its stderr lines)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # not pytest's
            os.chdir(cwd)
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork()
            from nemo_minitron.cli import main

            code = main(argv)
        except BaseException:  # noqa: BLE001 - any escape is a failure the parent reports
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code if isinstance(code, int) else 98)
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail(f"{argv[:2]} still running after {timeout} s: {open(log).read()[-2000:]}")
    with open(log) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    return os.waitstatus_to_exitcode(status), lines


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_hostile_nemo_runs_nothing_in_any_command(kind, corpus, inputs, tmp_path):
    """Each command: exit 2, one line naming the refusal, no marker, no output."""
    nemo, marker = corpus[kind]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    failures = []
    for name, argv in _commands(nemo, inputs, str(tmp_path / "out")).items():
        code, lines = _run_forked(argv, str(tmp_path / f"{name}.log"), repo)
        errors = [ln for ln in lines if ln.startswith("error:")]
        ok = (code == 2 and len(errors) == 1 and "refused" in errors[0]
              and not os.path.exists(marker) and not (tmp_path / "out").exists())
        if not ok:
            failures.append(f"{name}: exit {code}, marker {os.path.exists(marker)}, "
                            f"output {(tmp_path / 'out').exists()}: {lines[-3:]}")
    assert not failures, "\n".join(failures)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_readers_refuse_and_name_the_class(kind, corpus, tmp_path):
    """The library call (what every command goes through): one-line CheckpointError that names
    what the file asked for, and says nothing of weights_only=False."""
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf
    from nemo_minitron.errors import CheckpointError

    nemo, marker = corpus[kind]
    with pytest.raises(CheckpointError) as e:
        nemo_to_hf(nemo, str(tmp_path / "out"), progress=False)
    message = str(e.value)
    assert "\n" not in message and "refused" in message
    assert "system" in message  # posix.system (os.system's module on Linux)
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert not os.path.exists(marker) and not (tmp_path / "out").exists()


def test_megatron_load_path_checks_every_pickle_first(corpus, clean, tmp_path):
    """Before Megatron's dist_checkpointing.load (which unpickles .metadata, common.pt and byte
    objects without limits), check_torch_dist reads each one safely and refuses the hostile ones;
    the clean checkpoint passes."""
    from nemo_minitron.convert.dist_ckpt import check_torch_dist
    from nemo_minitron.errors import CheckpointError

    check_torch_dist(os.path.join(clean.trees["torch_dist"], "model_weights"))
    for kind in ("metadata_bare", "metadata_planner_data", "common_pt", "byte_object"):
        tree = tmp_path / kind
        with tarfile.open(corpus[kind][0]) as tar:
            tar.extractall(tree, filter="data")
        with pytest.raises(CheckpointError, match="refused"):
            check_torch_dist(str(tree / "model_weights"))
        assert not os.path.exists(corpus[kind][1])


def test_metadata_reader_calls_nothing_outside_the_list(tmp_path, monkeypatch):
    """A .metadata naming ``builtins.print`` (or an OrderedDict: anything not on the list) is
    refused without calling it; there is no fallback to torch's reader."""
    import collections

    from nemo_minitron.checkpoint.untrusted import read_dcp_metadata
    from nemo_minitron.errors import CheckpointError

    calls = []

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    files = [(pickle.dumps({"x": Evil()}), "builtins.print"),
             (pickle.dumps({"x": collections.OrderedDict(a=1)}), "collections.OrderedDict")]
    monkeypatch.setattr("builtins.print", lambda *a: calls.append(a))
    for data, name in files:
        (tmp_path / ".metadata").write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"refused: it names {name}"):
            read_dcp_metadata(str(tmp_path))
    assert calls == []


def test_scores_file_is_loaded_weights_only(tmp_path):
    """prune's scores= file (also user-supplied) is refused the same way."""
    from nemo_minitron.config import get_preset
    from nemo_minitron.errors import ConfigError
    from nemo_minitron.prune.importance import load_scores

    marker = tmp_path / "PWNED"
    torch.save({"version": _Payload(str(marker))}, tmp_path / "scores.pt")
    with pytest.raises(ConfigError, match="refused: its pickle names .*system"):
        load_scores(str(tmp_path / "scores.pt"), get_preset("tiny_llama31"))
    assert not marker.exists()
