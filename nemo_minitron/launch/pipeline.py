"""The Minitron pipeline as dependent SLURM jobs: convert -> prune -> distill -> export.

    nemo-minitron pipeline --teacher /lustre/Llama-3.1-8B --workdir /lustre/minitron \\
        --data /lustre/corpus.jsonl --prune-config minitron_4b_width \\
        --distill-config llama31_8b_to_minitron_4b_width \\
        --nodes 2 --gpus-per-node 8 --partition batch --account proj --time 04:00:00 \\
        --mounts /lustre:/lustre [--teacher-correction-config FILE] [--dry-run]

Each stage is one ``nemo-minitron`` command (nemo_minitron/launch/slurm.py renders its job) and
starts only after the previous one succeeded (``--dependency=afterok:ID``). Files, all in WORKDIR:

    teacher.nemo        convert hf-to-nemo TEACHER (one task; no stage when TEACHER is a .nemo)
    teacher_corrected.nemo   optional: finetune of the teacher (Minitron's teacher correction)
    student.nemo        prune (one task per GPU; --prune-config, default: prune's defaults)
    distilled.nemo      distill the student from the teacher (one task per GPU)
    distilled_hf/       convert nemo-to-hf (one task)

A stage is data (a name and its argv); add one by appending to :func:`stages`. It runs from any
directory: paths are made absolute, a relative config not found here names one shipped in the
package (``nemo-minitron configs``), and what the jobs read and write is mounted (nemo_minitron/launch/slurm.py). The
teacher is checked (an HF directory with config.json, or a .nemo) only when submitting: a
``--dry-run`` needs no local inputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from nemo_minitron.errors import ConfigError
from nemo_minitron.launch import slurm


@dataclass(frozen=True)
class Stage:
    name: str
    command: List[str]  # nemo-minitron COMMAND ARGS


def _config(flag: str, path: Optional[str]) -> List[str]:
    return [flag, path] if path else []


def stages(teacher: str, workdir: str, data: str, prune_config: Optional[str] = None,
           distill_config: Optional[str] = None, prune_overrides: Sequence[str] = (),
           distill_overrides: Sequence[str] = (), calib_data: Optional[str] = None,
           teacher_correction_config: Optional[str] = None,
           correction_data: Optional[str] = None) -> List[Stage]:
    """The jobs in order; each reads what the one before wrote."""
    w = lambda name: os.path.join(workdir, name)  # noqa: E731
    if teacher.endswith(".nemo"):
        teacher_nemo, out = teacher, []
    else:
        teacher_nemo = w("teacher.nemo")
        out = [Stage("convert", ["convert", "hf-to-nemo", teacher, teacher_nemo])]
    if teacher_correction_config:
        corrected = w("teacher_corrected.nemo")
        out.append(Stage("teacher_correction", [
            "finetune", "--config", teacher_correction_config, "--model", teacher_nemo,
            "--data", correction_data or data, "--out", corrected]))
        teacher_nemo = corrected
    out.append(Stage("prune", ["prune", *_config("--config", prune_config), "--model",
                               teacher_nemo, *_config("--data", calib_data), "--out",
                               w("student.nemo"), *prune_overrides]))
    out.append(Stage("distill", ["distill", *_config("--config", distill_config), "--teacher",
                                 teacher_nemo, "--student", w("student.nemo"), "--data", data,
                                 "--out", w("distilled.nemo"), *distill_overrides]))
    out.append(Stage("export", ["convert", "nemo-to-hf", w("distilled.nemo"), w("distilled_hf")]))
    return out


def placeholder(stage: str) -> str:
    """What a dry run shows in place of a job id not yet known."""
    return f"JOBID_OF_{stage.upper()}"


def run(opts: slurm.SlurmOptions, jobs: Sequence[Stage], dry_run: bool = False) -> List[str]:
    """Submit ``jobs`` in order, each after the previous (the first after ``opts.after``); returns
    the job ids, or with ``dry_run`` the scripts. Every stage is rendered and checked before the
    first submission."""
    prefix = opts.job_name
    rendered = []
    for job in jobs:
        o = dataclasses.replace(opts, job_name=f"{prefix}-{job.name}")
        o = slurm.prepare(o, job.command)
        rendered.append((o, job))
    if dry_run:
        scripts = []
        for i, (o, job) in enumerate(rendered):
            after = placeholder(jobs[i - 1].name) if i else o.after
            scripts.append(slurm.render(dataclasses.replace(o, after=after), job.command))
        return scripts
    ids: List[str] = []
    for o, job in rendered:
        o = dataclasses.replace(o, after=ids[-1] if ids else o.after)
        ids.append(slurm.sbatch(slurm.write_script(slurm.render(o, job.command), o)))
    return ids


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="nemo-minitron pipeline", allow_abbrev=False,
                                description="convert -> prune -> distill -> export as dependent "
                                            "SLURM jobs")
    p.add_argument("--teacher", required=True,
                   help="the teacher: HF checkpoint directory (converted first) or .nemo")
    p.add_argument("--workdir", required=True, help="where every stage writes its output and "
                                                    "the logs (the jobs run in --job-dir)")
    p.add_argument("--data", required=True, help="distillation data (see nemo-minitron distill)")
    p.add_argument("--calib-data", help="pruning calibration data (default: prune's own)")
    p.add_argument("--prune-config", help="prune YAML or shipped name (nemo-minitron configs "
                                          "prune; default: prune's defaults)")
    p.add_argument("--distill-config", help="distill YAML or shipped name (nemo-minitron "
                                            "configs distill)")
    p.add_argument("--prune-override", action="append", default=[], metavar="key=value",
                   help="a key=value for the prune stage (repeatable)")
    p.add_argument("--distill-override", action="append", default=[], metavar="key=value",
                   help="a key=value for the distill stage (repeatable)")
    p.add_argument("--teacher-correction-config",
                   help="add a first stage: finetune the teacher with this YAML")
    p.add_argument("--correction-data", help="teacher-correction data (default: --data)")
    slurm.add_arguments(p)
    args = p.parse_args(argv)
    job_dir = os.path.abspath(args.job_dir or os.getcwd())
    # absolute, as the jobs see them
    path = lambda x: x and os.path.abspath(os.path.join(job_dir, x))  # noqa: E731
    workdir, teacher = path(args.workdir), path(args.teacher)
    if not args.dry_run and not (teacher.endswith(".nemo") and os.path.exists(teacher)) and \
            not os.path.isfile(os.path.join(teacher, "config.json")):
        raise ConfigError(f"--teacher {teacher}: neither a .nemo nor an HF checkpoint directory "
                          "(no config.json)")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is not a directory")
    def config(x, kind):  # a file here (made absolute), else a shipped config's name
        if x and os.path.isfile(os.path.join(job_dir, x)):
            return os.path.abspath(os.path.join(job_dir, x))
        if x:
            slurm.check_config(["--config", x], job_dir, kind)
        return x

    data = lambda x: x if x in (None, "pydoc") else path(x)  # noqa: E731 - pydoc: built in
    jobs = stages(teacher, workdir, data(args.data), config(args.prune_config, "prune"),
                  config(args.distill_config, "distill"), args.prune_override, args.distill_override,
                  data(args.calib_data), config(args.teacher_correction_config, "distill"),
                  data(args.correction_data))
    opts = slurm.options_from_args(args, job_name=args.job_name or "minitron",
                                   log_dir=args.log_dir or os.path.join(workdir, "slurm_logs"))
    if not args.dry_run:
        os.makedirs(workdir, exist_ok=True)
    out = run(opts, jobs, dry_run=args.dry_run)
    for job, item in zip(jobs, out):
        print(f"# ---- {job.name} ----\n{item}" if args.dry_run else f"{job.name}: {item}")
    return 0
