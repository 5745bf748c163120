"""Find the architecture of whatever the user names: a preset, an HF directory or config.json, a
NeMo model_config.yaml, or a .nemo file (tar or tar.gz, or its extracted directory)."""
from __future__ import annotations

import os
import tarfile
import tempfile
from typing import Tuple

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.hf import read_hf_config
from nemo_minitron.config.nemo import read_nemo_config
from nemo_minitron.config.presets import PRESETS, get_preset
from nemo_minitron.errors import CheckpointError


def _nemo_member(path: str) -> str:
    """Copy model_config.yaml out of a .nemo archive into a temporary file; return its path."""
    try:
        with tarfile.open(path, "r:*") as tar:
            names = [m for m in tar.getmembers()
                     if os.path.basename(m.name) == "model_config.yaml" and m.isfile()]
            if not names:
                raise CheckpointError(f"{path}: no model_config.yaml in the .nemo archive")
            data = tar.extractfile(names[0]).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .nemo (tar) file ({e})") from None
    fd, tmp = tempfile.mkstemp(suffix="-model_config.yaml")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


def resolve_config(source: str, **nemo_kwargs) -> Tuple[ModelConfig, str]:
    """(config, description of where it came from) for a preset name or a path."""
    if source in PRESETS:
        return get_preset(source), f"preset {source}"
    if not os.path.exists(source):
        raise CheckpointError(f"{source}: neither a preset ({', '.join(PRESETS)}) nor an existing path")
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            return read_hf_config(source), f"HF checkpoint {source}"
        if os.path.isfile(os.path.join(source, "model_config.yaml")):
            return (read_nemo_config(os.path.join(source, "model_config.yaml"), **nemo_kwargs),
                    f"extracted .nemo {source}")
        raise CheckpointError(f"{source}: directory has neither config.json (HF) nor "
                              "model_config.yaml (extracted .nemo)")
    if source.endswith(".json"):
        return read_hf_config(source), f"HF config {source}"
    if source.endswith((".yaml", ".yml")):
        return read_nemo_config(source, **nemo_kwargs), f"NeMo config {source}"
    if tarfile.is_tarfile(source):
        tmp = _nemo_member(source)
        try:
            return read_nemo_config(tmp, label=source, **nemo_kwargs), f".nemo file {source}"
        finally:
            os.unlink(tmp)
    raise CheckpointError(f"{source}: not a config.json, model_config.yaml, .nemo file or "
                          "checkpoint directory")
