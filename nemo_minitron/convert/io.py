"""Checkpoint paths as jobs see them: a .nemo (file or extracted directory) or an HF directory.

Inputs are read natively (``nemo_minitron.model.source.ModelSource``: no temporary HF copy);
outputs are written natively by the job's ranks (``nemo_minitron.model.save``).
"""
from __future__ import annotations

import os

# Variables of the job's launcher; a fresh child process (demo.py's steps) is a world of one.
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "MASTER_ADDR", "MASTER_PORT")


def is_nemo(path: str) -> bool:
    return path.endswith(".nemo") or (
        os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_config.yaml")))


def single_process_env() -> dict:
    """This process's environment without the launcher's variables: for a fresh process that is
    a world of one whatever launched this one."""
    return {k: v for k, v in os.environ.items()
            if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
