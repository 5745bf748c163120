"""Checkpoint paths as jobs see them: a .nemo (file or extracted directory) or an HF directory.

Jobs work on HF directories internally. A ``.nemo`` input is converted to a temporary HF directory
(streamed, bit-exact); a ``.nemo`` output is written as an HF directory and then converted by a
*fresh* ``nemo-minitron convert hf-to-nemo`` process: a job's own process has (or had) a
multi-rank process group, inside which a 1-rank dist_checkpointing save would hang, and a process
that has used torch.distributed cannot safely fork a writer afterwards.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from typing import Iterator, Optional

from nemo_minitron import lifecycle
from nemo_minitron.checkpoint import scratch
from nemo_minitron.errors import CheckpointError

# Variables of the job's launcher; the converter process is a world of one.
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "MASTER_ADDR", "MASTER_PORT")


def is_nemo(path: str) -> bool:
    return path.endswith(".nemo") or (
        os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_config.yaml")))


@contextlib.contextmanager
def as_hf_dir(path: str, workdir: Optional[str] = None) -> Iterator[str]:
    """``path`` itself if it is an HF directory, else a temporary HF conversion of the .nemo."""
    if not is_nemo(path):
        yield path
        return
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    tmp = scratch.make_dir(".nemo-as-hf-", workdir)
    try:
        out, _ = nemo_to_hf(path, os.path.join(tmp, "hf"), progress=False)
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def single_process_env() -> dict:
    """This process's environment without the launcher's variables: for a fresh process that is
    a world of one whatever launched this one."""
    return {k: v for k, v in os.environ.items()
            if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}


def hf_dir_to_nemo(hf_dir: str, out: str, *, dtype: str = "bf16", overwrite: bool = False) -> str:
    """Convert ``hf_dir`` to the .nemo ``out`` in a fresh process; return ``out``. That process
    dies with this one (nemo_minitron/lifecycle.py): a killed job's export never appears later."""
    env = lifecycle.child_env(single_process_env())
    cmd = [sys.executable, "-m", "nemo_minitron.cli", "convert", "hf-to-nemo", hf_dir, out,
           "--dtype", dtype] + (["--overwrite"] if overwrite else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        message = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"writing {out} failed: {message}")
    return os.path.abspath(out)


def hf_view_of(stack: contextlib.ExitStack, section, attr: str) -> None:
    """If ``section.attr`` names a .nemo, point it at a temporary HF conversion kept open by
    ``stack`` (recipes read HF directories). Each rank converts its own copy."""
    path = getattr(section, attr)
    if path and is_nemo(path):
        setattr(section, attr, stack.enter_context(as_hf_dir(path)))
