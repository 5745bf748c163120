"""Every error case: one-line message, exit status 2, nothing half-written, no silent overwrite,
safe extraction."""
import io
import json
import os
import tarfile

import pytest

from nemo_minitron.cli import main
from nemo_minitron.convert.nemo_file import safe_extract
from nemo_minitron.errors import CheckpointError
from tests.convert_helpers import GOLDEN


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from tests.convert_helpers import GOLDEN_CFG

    return write_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("e") / "hf"), GOLDEN_CFG, seed=7,
                                    tokenizer=False)


def _cli_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_truncated_nemo(tmp_path, capsys):
    data = open(os.path.join(GOLDEN, "zarr_tp1.nemo"), "rb").read()
    bad = tmp_path / "bad.nemo"
    bad.write_bytes(data[: len(data) // 2])
    err = _cli_error(capsys, ["convert", "nemo-to-hf", str(bad), str(tmp_path / "out")])
    assert "bad.nemo" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.nemo"]


def test_missing_shard_and_bad_index(hf_dir, tmp_path, capsys):
    import shutil

    for case in ("missing", "index"):
        src = tmp_path / case
        shutil.copytree(hf_dir, src)
        if case == "missing":
            os.unlink(src / "model-00002-of-00002.safetensors")
        else:
            idx = json.loads((src / "model.safetensors.index.json").read_text())
            name = sorted(idx["weight_map"])[0]
            idx["weight_map"][name] = "model-00002-of-00002.safetensors" \
                if idx["weight_map"][name].startswith("model-00001") else "model-00001-of-00002.safetensors"
            (src / "model.safetensors.index.json").write_text(json.dumps(idx))
        err = _cli_error(capsys, ["convert", "hf-to-nemo", str(src), str(tmp_path / f"{case}.nemo"),
                                  "--tokenizer-type", "x"])
        assert ("missing" in err) if case == "missing" else ("disagrees" in err)
        assert not [e for e in os.listdir(tmp_path) if e.endswith(".nemo") or e.startswith(".")]


def test_unsupported_config(hf_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["attention_bias"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    err = _cli_error(capsys, ["convert", "hf-to-nemo", str(src), str(tmp_path / "o.nemo")])
    assert "attention_bias" in err
    assert not (tmp_path / "o.nemo").exists()


def test_no_overwrite_without_flag(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    err = _cli_error(capsys, ["convert", "nemo-to-hf", os.path.join(GOLDEN, "zarr_tp1.nemo"),
                              str(out)])
    assert "--overwrite" in err and (out / "keep").exists()
    assert main(["convert", "nemo-to-hf", os.path.join(GOLDEN, "zarr_tp1.nemo"), str(out),
                 "--overwrite"]) == 0
    assert not (out / "keep").exists() and (out / "config.json").exists()


def test_out_is_given_once_and_nothing_is_written_otherwise(tmp_path, capsys):
    src = os.path.join(GOLDEN, "zarr_tp1.nemo")
    a, b = tmp_path / "a", tmp_path / "b"
    err = _cli_error(capsys, ["convert", "nemo-to-hf", src, str(a), "--out", str(b)])
    assert "given twice" in err and not a.exists() and not b.exists()
    err = _cli_error(capsys, ["convert", "nemo-to-hf", src])
    assert "no output given: add --out PATH" in err
    # --out writes what the positional writes
    assert main(["convert", "nemo-to-hf", src, "--out", str(b)]) == 0
    assert main(["convert", "nemo-to-hf", src, str(a)]) == 0
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("kind", ["escape", "absolute", "symlink", "hardlink"])
def test_extraction_refuses_unsafe_members(tmp_path, kind):
    archive = tmp_path / "evil.nemo"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo({"escape": "../evil.txt", "absolute": "/tmp/evil.txt"}.get(kind, "x"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(CheckpointError, match="refusing"):
        safe_extract(str(archive), str(target))
    assert os.listdir(target) == [] and not (tmp_path / "evil.txt").exists()


def test_missing_zarr_chunk_and_legacy_extra_key(tmp_path, capsys):
    import torch

    tree = tmp_path / "z"
    tree.mkdir()
    safe_extract(os.path.join(GOLDEN, "zarr_tp2.nemo"), str(tree))
    os.unlink(tree / "model_weights" / "model.decoder.layers.mlp.linear_fc1.weight" / "1.2.0")
    err = _cli_error(capsys, ["convert", "nemo-to-hf", str(tree), str(tmp_path / "o")])
    assert "1.2.0" in err and "missing" in err
    assert main(["convert", "nemo-to-hf", os.path.join(GOLDEN, "zarr_tp1.nemo"),
                 str(tmp_path / "hf")]) == 0
    assert main(["convert", "hf-to-nemo", str(tmp_path / "hf"), str(tmp_path / "l.nemo"),
                 "--format", "legacy"]) == 0
    legacy = tmp_path / "l"
    legacy.mkdir()
    safe_extract(str(tmp_path / "l.nemo"), str(legacy))
    state = torch.load(legacy / "model_weights.ckpt", weights_only=True)
    state["model.decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(3)
    torch.save(state, legacy / "model_weights.ckpt")
    err = _cli_error(capsys, ["convert", "nemo-to-hf", str(legacy), str(tmp_path / "o2")])
    assert "linear_qkv.bias" in err and not (tmp_path / "o2").exists()


def test_nemo_flag_scripts(tmp_path):
    import runpy

    ns = runpy.run_path(os.path.join(os.path.dirname(GOLDEN), "..", "..", "scripts",
                                     "convert_nemo_to_hf.py"))
    assert ns["main"](["--input_name_or_path", os.path.join(GOLDEN, "zarr_tp1.nemo"),
                       "--output_path", str(tmp_path / "hf"), "--precision", "32"]) == 0
    ns = runpy.run_path(os.path.join(os.path.dirname(GOLDEN), "..", "..", "scripts",
                                     "convert_hf_to_nemo.py"))
    assert ns["main"](["--input_name_or_path", str(tmp_path / "hf"), "--output_path",
                       str(tmp_path / "m.nemo"), "--precision", "bf16", "--format", "legacy"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float32"


def test_program_exit_codes_and_output(tmp_path):
    """The program (``python -m nemo_minitron.cli``, the console script): a conversion leaves
    without the interpreter's teardown once its output is flushed (exit 0, the message printed,
    the output complete); an error still exits 2 with its one-line message."""
    import subprocess
    import sys

    out = tmp_path / "hf"
    ok = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "convert", "nemo-to-hf",
                         os.path.join(GOLDEN, "zarr_tp1.nemo"), str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote ") and ok.stdout.endswith("\n")
    assert (out / "model.safetensors.index.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "convert", "nemo-to-hf",
                          os.path.join(GOLDEN, "zarr_tp1.nemo"), str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "exists" in bad.stderr and bad.stderr.startswith("error: ")
