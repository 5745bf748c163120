"""The .nemo container: an uncompressed tar (gzip also read) of ``model_config.yaml``, the weights
and (ours) the HF tokenizer files; or the same tree extracted into a directory.

Extraction is safe: members that would land outside the target (absolute paths, ``..``), links and
device files are refused, and a truncated or corrupt archive is one error. Packing writes to a
temporary name and renames, so a failed conversion never leaves a half-written .nemo.

Weight layouts, by what exists (NeMo's own rule, shared/FACTS.md section 3):
``model_weights/`` with ``metadata.json`` (torch_dist or zarr), ``model_weights.ckpt`` (legacy TP=PP=1),
``mp_rank_XX/model_weights.ckpt`` (TP>1) or ``tp_rank_XX_pp_rank_XXX/model_weights.ckpt`` (PP>1).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tarfile
import tempfile
from typing import Iterator, Tuple

from nemo_minitron.errors import CheckpointError, MinitronError

CONFIG_NAME = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
LEGACY_NAME = "model_weights.ckpt"
TOKENIZER_DIR = "tokenizer"  # our packed HF tokenizer files, referenced from model_config.yaml
_MP_RE = re.compile(r"^mp_rank_(\d{2})$")
_TP_PP_RE = re.compile(r"^tp_rank_(\d{2})_pp_rank_(\d{3})$")


def safe_extract(archive: str, target: str) -> None:
    """Extract ``archive`` (tar or tar.gz) into the existing directory ``target``."""
    root = os.path.realpath(target)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name
                dest = os.path.realpath(os.path.join(root, name))
                if os.path.isabs(name) or not (dest == root or dest.startswith(root + os.sep)):
                    raise CheckpointError(f"{archive}: member {name!r} would be extracted outside "
                                          "the target directory; refusing")
                if member.issym() or member.islnk():
                    raise CheckpointError(f"{archive}: member {name!r} is a link; refusing")
                if member.isdir():
                    os.makedirs(dest, exist_ok=True)
                    continue
                if not member.isfile():
                    raise CheckpointError(f"{archive}: member {name!r} is not a regular file; "
                                          "refusing")
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                src = tar.extractfile(member)
                with open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 16 << 20)
                if os.path.getsize(dest) != member.size:
                    raise CheckpointError(f"{archive}: member {name!r} is truncated")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{archive}: not a readable .nemo (tar) file "
                              f"({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def opened_nemo(path: str) -> Iterator[str]:
    """Yield a directory holding the .nemo's tree: the directory itself, or a temporary extraction
    (next to the archive's default temp dir; removed afterwards)."""
    if os.path.isdir(path):
        yield _content_root(path)
        return
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such .nemo file or directory")
    tmp = tempfile.mkdtemp(prefix="nemo-extract-")
    try:
        safe_extract(path, tmp)
        yield _content_root(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _content_root(directory: str) -> str:
    """NeMo tars ``./model_config.yaml``; some tools add one top-level folder."""
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return directory
    entries = [e for e in os.listdir(directory) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isfile(os.path.join(directory, entries[0], CONFIG_NAME)):
        return os.path.join(directory, entries[0])
    raise CheckpointError(f"{directory}: no {CONFIG_NAME} (not a .nemo tree)")


def detect_layout(root: str) -> Tuple[str, int, int]:
    """(layout, tp, pp) of the weights under an extracted .nemo: layout is ``torch_dist``,
    ``zarr`` or ``legacy`` (tp/pp: the per-rank files' layout; 1, 1 for a distributed checkpoint)."""
    from nemo_minitron.convert.dist_ckpt import read_backend

    weights = os.path.join(root, WEIGHTS_DIR)
    if os.path.isdir(weights):
        return read_backend(weights), 1, 1
    if os.path.isfile(os.path.join(root, LEGACY_NAME)):
        return "legacy", 1, 1
    ranks = []
    for entry in os.listdir(root):
        m, m2 = _MP_RE.match(entry), _TP_PP_RE.match(entry)
        if m:
            ranks.append((int(m.group(1)), 0))
        elif m2:
            ranks.append((int(m2.group(1)), int(m2.group(2))))
    if not ranks:
        raise CheckpointError(f"{root}: no weights ({WEIGHTS_DIR}/, {LEGACY_NAME}, mp_rank_XX/ or "
                              "tp_rank_XX_pp_rank_XXX/)")
    tp = max(r[0] for r in ranks) + 1
    pp = max(r[1] for r in ranks) + 1
    if len(set(ranks)) != tp * pp:
        raise CheckpointError(f"{root}: per-rank weight directories are incomplete: found "
                              f"{sorted(ranks)} for TP={tp} PP={pp}")
    return "legacy", tp, pp


def rank_file(root: str, tp_rank: int, pp_rank: int, tp: int, pp: int) -> str:
    """Path of a legacy weights file, named as NeMo names it for the layout."""
    if tp == 1 and pp == 1:
        return os.path.join(root, LEGACY_NAME)
    if pp == 1:
        return os.path.join(root, f"mp_rank_{tp_rank:02d}", LEGACY_NAME)
    return os.path.join(root, f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}", LEGACY_NAME)


def pack_nemo(src_dir: str, out_path: str, overwrite: bool = False) -> None:
    """Tar ``src_dir``'s contents (uncompressed, as NeMo writes) into ``out_path`` atomically."""
    out_path = os.path.abspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise MinitronError(f"{out_path} exists; pass --overwrite to replace it")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out_path)}.tmp-",
                               dir=os.path.dirname(out_path))
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for entry in sorted(os.listdir(src_dir)):
                tar.add(os.path.join(src_dir, entry), arcname=f"./{entry}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
