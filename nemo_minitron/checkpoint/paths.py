"""Checks on the paths a command reads and writes, made before any expensive work.

    check_output("out.nemo", "--out", overwrite=False, kind="file")
    check_disjoint({"--out": out}, {"--model": base, "--data": data})
    fingerprint(base)  # "sha256:..." of a checkpoint's identity, cheap on a 16 GB model

Every command calls these first, so a bad output path fails in a second, as one line, and no
command ever writes over one of its own inputs.
"""
from __future__ import annotations

import hashlib
import os
from typing import Mapping, Optional

from nemo_minitron.errors import ConfigError

# files up to this size are hashed whole; larger ones by _WINDOWS windows of _WINDOW bytes
_WHOLE = 320 << 10
_WINDOW = 64 << 10
_WINDOWS = 5


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _nearest_existing(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_output(path: Optional[str], label: str = "--out", *, overwrite: bool = False,
                 overwrite_hint: str = "--overwrite", kind: str = "any") -> None:
    """``path`` can be written: given, not existing (unless ``overwrite``), of the right ``kind``
    where it exists (``file``: a .nemo or .jsonl; ``dir``: an HF directory; ``any``), and in a
    writable place (the nearest existing parent is a directory we may create entries in)."""
    if not path:
        raise ConfigError(f"no output path given ({label})")
    full = os.path.abspath(path)
    if kind == "file" and os.path.isdir(full):
        raise ConfigError(f"{label} {path} is a directory; the output is a file")
    if kind == "dir" and os.path.lexists(full) and not os.path.isdir(full):
        raise ConfigError(f"{label} {path} is a file; the output is a directory")
    if os.path.lexists(full) and not overwrite:
        raise ConfigError(f"{full} exists; pass {overwrite_hint} to replace it")
    parent = _nearest_existing(full)
    if not os.path.isdir(parent):
        raise ConfigError(f"{label} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{label} {path}: cannot write in {parent} (read-only or permission "
                          "denied)")


def check_disjoint(outputs: Mapping[str, Optional[str]], inputs: Mapping[str, Optional[str]]
                   ) -> None:
    """Refuse an output that is, contains, or is inside one of the inputs (labels are the flags
    the user typed). Inputs that are not existing paths (``pydoc``, a hub id) are skipped."""
    for olabel, out in outputs.items():
        if not out:
            continue
        ro = _real(out)
        for ilabel, inp in inputs.items():
            if not inp or not os.path.lexists(inp):
                continue
            ri = _real(inp)
            same = ro == ri or (os.path.exists(out) and os.path.samefile(out, inp))
            if same:
                raise ConfigError(f"{olabel} {out} is the input {ilabel} {inp}: an input is never "
                                  "written over; choose another output")
            if ri.startswith(ro.rstrip(os.sep) + os.sep):
                raise ConfigError(f"{olabel} {out} contains the input {ilabel} {inp}: writing it "
                                  "would replace the input; choose another output")
            if ro.startswith(ri.rstrip(os.sep) + os.sep):
                raise ConfigError(f"{olabel} {out} is inside the input {ilabel} {inp}: outputs are "
                                  "never written into an input; choose another output")


def _hash_file(h, path: str, size: int) -> None:
    with open(path, "rb") as f:
        if size <= _WHOLE:
            h.update(f.read())
            return
        for i in range(_WINDOWS):  # start, quarters, end: headers, embeddings, layers, output
            f.seek((size - _WINDOW) * i // (_WINDOWS - 1))
            h.update(f.read(_WINDOW))


def fingerprint(path: str) -> str:
    """A content fingerprint of a file or directory (a checkpoint, a data file) that costs a few
    MB of reads whatever the size: every file's relative name and size, small files (configs,
    indexes, tokenizers) whole, large ones by five 64 KiB windows (start, quarters, end). Names
    starting with ``.`` (temporary files) are skipped; modification times are not used, so a copy
    keeps its fingerprint. Two models of the same shape differ in their sampled weights."""
    h = hashlib.sha256()
    try:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    full = os.path.join(root, name)
                    if not os.path.isfile(full):
                        continue
                    size = os.path.getsize(full)
                    h.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
                    _hash_file(h, full, size)
        else:
            size = os.path.getsize(path)
            h.update(f"{size}\0".encode())
            _hash_file(h, path, size)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    return "sha256:" + h.hexdigest()


OUT_FORMATS = ("auto", "nemo_dir")


def check_output_path(out: str, out_format: str = "auto") -> None:
    """Called before training, so a bad output path fails first, not after hours. ``out_format``:
    auto (a path ending in .nemo is a .nemo file, any other an HF directory) or nemo_dir (an
    extracted .nemo directory, the tar's tree unpacked)."""
    if not out:
        raise ConfigError("no output path given (--out)")
    if out_format not in OUT_FORMATS:
        raise ConfigError(f"out_format={out_format!r} must be one of {', '.join(OUT_FORMATS)}")
