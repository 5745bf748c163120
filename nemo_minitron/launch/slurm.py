"""sbatch scripts for any ``nemo-minitron`` job: one srun task per GPU inside a pyxis container.

    nemo-minitron slurm finetune --config minitron_4b_width_sft \\
        --nodes 2 --gpus-per-node 8 --partition batch --account proj --time 04:00:00 \\
        --mounts /lustre/data:/lustre/data -- --model 4b_width.nemo --data train.jsonl --out sft.nemo

How the job reaches the code: the checkout holding this package is mounted into the container at
the same path (``--container-mounts REPO:REPO``; a non-editable install mounts only its package
directory, read-only, at /opt/nemo-minitron/nemo_minitron) and put first on the container's own
``PYTHONPATH`` (each task runs ``bash -c 'export PYTHONPATH="REPO${PYTHONPATH:+:$PYTHONPATH}";
exec python -m nemo_minitron.cli COMMAND ARGS'`` inside the container: the image's entries, e.g.
NeMo's, stay; the submitting host's ``PYTHONPATH`` is unset in the batch script), so the job uses
the image's own torch, megatron-core and Lightning (nothing is installed into the image).

Every mount keeps its path (``SRC:SRC``), so the paths of the submitting shell are valid in the
job. What the job needs is mounted without asking: the checkout, the job's working directory
(``--job-dir``, default the current one) and the directory holding each absolute path given to
``--config``, ``--model``, ``--data``, ``--out``, ``--teacher``, ``--student``, ``--prompts``,
``--base``, ``--adapter`` or to ``convert``. A relative ``--config`` that is a file in the working
directory is made absolute; otherwise it must name a config shipped in the package
(``nemo-minitron configs``), which the job's copy of the package resolves the same way, so
``nemo-minitron slurm`` works from any directory. Paths inside ``key=value`` overrides are not
mounted: use ``--mounts`` for those.

Ranks come from SLURM (``nemo_minitron.dist``): ``--ntasks-per-node`` equals the GPUs per node and
there is no torchrun. Quoting: every user value reaches the job as one verbatim argument --
``shlex.quote`` in the shell part, and in ``#SBATCH`` lines the double-quoted form that sbatch's
own directive parser undoes (backslash escapes, then quotes); newlines are refused.
"""
from __future__ import annotations

import dataclasses
import operator
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from nemo_minitron.errors import ConfigError, MinitronError

DEFAULT_IMAGE = "nvcr.io/nvidia/nemo:24.05"
PYXIS_FLAGS = ("--no-container-mount-home",)
# NVTE_*: the Transformer Engine attention backends of the 24.05 image (both enabled; override
# with --env NVTE_FUSED_ATTN=0 where a kernel misbehaves).
BASE_ENV = (("TORCH_NCCL_AVOID_RECORD_STREAMS", "1"), ("NVTE_FUSED_ATTN", "1"),
            ("NVTE_FLASH_ATTN", "1"))
# sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}"
                   r"|\d+-\d{1,2}:\d{1,2}:\d{1,2})$")
_JOB_ID = re.compile(r"^\d+(_\d+)?$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def repo_root() -> str:
    """The checkout holding this package (mounted into the container at the same path)."""
    import nemo_minitron

    return os.path.dirname(os.path.dirname(os.path.abspath(nemo_minitron.__file__)))


# where a non-editable install's package is mounted (its site-packages never is: the host's torch
# would shadow the image's)
INSTALLED_CODE_DIR = "/opt/nemo-minitron"


def code_mount() -> Tuple[str, str, str]:
    """(host path, container path, PYTHONPATH entry) of the code the job runs: a checkout (it has
    recipes/; pip install -e) at its own path, else only the installed package directory."""
    root = repo_root()
    if os.path.isdir(os.path.join(root, "recipes")):
        return root, root, root
    return (os.path.join(root, "nemo_minitron"),
            os.path.join(INSTALLED_CODE_DIR, "nemo_minitron"), INSTALLED_CODE_DIR)


@dataclass
class SlurmOptions:
    """One sbatch job. ``ntasks_per_node`` None: one task per GPU (training); 1: a one-process job
    (conversion)."""

    job_name: str = "nemo-minitron"
    nodes: int = 1
    gpus_per_node: int = 8
    ntasks_per_node: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "04:00:00"
    container: str = DEFAULT_IMAGE
    mounts: List[str] = field(default_factory=list)  # SRC:DST[:ro|rw]; the checkout is added
    log_dir: str = "slurm_logs"
    job_dir: Optional[str] = None  # the job's working directory; default: the current one
    after: Optional[str] = None  # job id: start after it succeeded (afterok)
    requeue: bool = False  # requeue on preemption: the job resumes from its last checkpoint
    signal_seconds: int = 300  # with requeue: warning time before the time limit / preemption
    exclusive: bool = True
    mem: Optional[str] = None  # --mem (0: all of the node's memory)
    env: List[str] = field(default_factory=list)  # extra KEY=VALUE exports
    python: str = "python"  # the container's interpreter
    model_parallel: int = 1  # TP (x CP) of the job: CUDA_DEVICE_MAX_CONNECTIONS=1 when > 1

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.ntasks_per_node is None else self.ntasks_per_node


def _no_newline(name: str, value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ConfigError(f"{name}={value!r}: newlines and NUL bytes are not allowed")
    return value


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def parse_mounts(mounts: Sequence[str]) -> List[Tuple[str, str, Optional[str]]]:
    """``["a:b", "c:d:ro"]`` (or comma-joined items) -> [(src, dst, flags)]; both paths absolute."""
    out = []
    for item in mounts:
        for m in item.split(","):
            parts = _no_newline("--mounts", m).split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]) or \
                    (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ConfigError(f"mount {m!r} must be SRC:DST or SRC:DST:ro|rw (no ':' or ',' "
                                  "inside the paths)")
            src, dst = parts[0], parts[1]
            if not os.path.isabs(src) or not os.path.isabs(dst):
                raise ConfigError(f"mount {m!r}: SRC and DST must be absolute paths")
            out.append((os.path.normpath(src), os.path.normpath(dst),
                        parts[2] if len(parts) == 3 else None))
    return out


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def validate(opts: SlurmOptions) -> SlurmOptions:
    """Check every value before anything is written; returns the options with absolute paths and
    the checkout added to the mounts."""
    for name in ("nodes", "gpus_per_node", "signal_seconds", "model_parallel"):
        _positive(name.replace("_", "-"), getattr(opts, name))
    if opts.ntasks_per_node is not None:
        _positive("ntasks-per-node", opts.ntasks_per_node)
    for name in ("job_name", "partition", "account", "container", "log_dir", "job_dir", "python",
                 "time", "after", "mem"):
        value = getattr(opts, name)
        if value is not None:
            _no_newline(name.replace("_", "-"), value)
            if not value:
                raise ConfigError(f"--{name.replace('_', '-')} must not be empty")
    if not _TIME.match(opts.time):
        raise ConfigError(f"--time={opts.time!r} is not a SLURM time (MM, HH:MM:SS, D-HH:MM:SS, ...)")
    if opts.after is not None and not _JOB_ID.match(opts.after):
        raise ConfigError(f"--after={opts.after!r} must be a job id (digits)")
    if opts.mem is not None and not _MEM.match(opts.mem):
        raise ConfigError(f"--mem={opts.mem!r} must be a number with an optional K/M/G/T suffix")
    for item in opts.env:
        name, sep, value = _no_newline("--env", item).partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ConfigError(f"--env {item!r} must be NAME=VALUE with a shell variable name")
    src, dst, _ = code_mount()
    mounts = parse_mounts(opts.mounts)
    if not any(_inside(src, d) and _inside(dst, d) and s == d for s, d, _ in mounts):
        mounts.insert(0, (src, dst, None if src == dst else "ro"))
    job_dir = os.path.abspath(opts.job_dir or os.getcwd())
    if not any(_inside(job_dir, dst) for _, dst, _ in mounts):
        mounts.append((_mountable(job_dir, "the job's working directory"), job_dir, None))
    return dataclasses.replace(
        opts, log_dir=os.path.abspath(os.path.join(job_dir, opts.log_dir)), job_dir=job_dir,
        mounts=[":".join(p for p in m if p) for m in mounts])


def _mountable(path: str, what: str) -> str:
    if "," in path or ":" in path:
        raise ConfigError(f"{what} {path} cannot be mounted automatically (',' or ':' in the "
                          "path); mount a directory above it with --mounts SRC:SRC")
    return path


def mount(opts: SlurmOptions, path: str, what: str) -> SlurmOptions:
    """The validated ``opts`` with ``path`` visible in the container: unchanged when a mount covers
    it, else with the directory holding it mounted at its own path (an output need not exist
    yet; the root directory is never mounted)."""
    path = os.path.abspath(os.path.join(opts.job_dir, path))
    if any(_inside(path, m.split(":")[1]) for m in opts.mounts):
        return opts
    parent = os.path.dirname(path)
    if parent == "/":
        return opts
    _mountable(parent, what)
    return dataclasses.replace(opts, mounts=[*opts.mounts, f"{parent}:{parent}"])


# flags of the jobs whose value is a path (mounted when absolute; relative ones are in the job dir)
PATH_FLAGS = ("--config", "--model", "--data", "--out", "--teacher", "--student", "--prompts",
              "--base", "--adapter")


def job_paths(command: Sequence[str]) -> List[Tuple[str, str]]:
    """(flag, path) for each path the job ``nemo-minitron COMMAND...`` is given."""
    out, args = [], list(command[1:])
    if command and command[0] == "convert":  # convert DIRECTION IN OUT [options]
        pos = [a for a in args[1:] if not a.startswith("-")][:2]
        out += [("convert", a) for a in pos]
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag in PATH_FLAGS and eq:
            out.append((flag, value))
        elif a in PATH_FLAGS and i + 1 < len(args):
            out.append((a, args[i + 1]))
    return [(f, p) for f, p in out if os.path.isabs(p)]


def check_config(command: Sequence[str], job_dir: str, kind: Optional[str] = None) -> None:
    """A relative ``--config`` of ``command`` must be a file in ``job_dir`` (where the job runs)
    or the name of a config shipped in the package (``tiny_sft``, ``conf/prune/tiny.yaml``),
    which the job's own copy of the package resolves the same way: both are passed on as given."""
    from nemo_minitron.config.recipe import find_config

    for i, a in enumerate(command[:-1]):
        if a == "--config" and not os.path.isabs(command[i + 1]) and \
                not os.path.isfile(os.path.join(job_dir, command[i + 1])):
            find_config(command[i + 1], kind)


def sbatch_quote(value: str) -> str:
    """Quote for an ``#SBATCH`` line: sbatch's parser drops an unescaped quote pair and turns
    ``\\x`` into ``x`` (also inside quotes), and ``#`` outside quotes starts a comment."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def job_env(opts: SlurmOptions) -> List[Tuple[str, str]]:
    """The exports of shared/FACTS.md section 6 (later entries win)."""
    env = [("CUDA_DEVICE_MAX_CONNECTIONS", "1")] if opts.model_parallel > 1 else []
    env += list(BASE_ENV)
    env += [tuple(item.split("=", 1)) for item in opts.env]
    return env


# run inside the container: the image's PYTHONPATH extended with $1 (the code), then the rest
EXTEND_PYTHONPATH = 'export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}"; shift; exec "$@"'


def job_argv(opts: SlurmOptions, command: Sequence[str]) -> List[str]:
    """What each task runs inside the container."""
    return ["bash", "-c", EXTEND_PYTHONPATH, "nemo-minitron", code_mount()[2], opts.python,
            "-m", "nemo_minitron.cli", *command]


def srun_argv(opts: SlurmOptions) -> List[str]:
    return ["srun", f"--container-image={opts.container}",
            f"--container-mounts={','.join(opts.mounts)}", f"--container-workdir={opts.job_dir}",
            *PYXIS_FLAGS]


def directives(opts: SlurmOptions) -> List[str]:
    """``#SBATCH`` option values, in order (``--name=value``, values sbatch-quoted)."""
    log = opts.log_dir.replace("%", "%%")  # sbatch expands %x, %j, ... in --output
    d = [f"--job-name={sbatch_quote(opts.job_name)}", f"--nodes={opts.nodes}",
         f"--ntasks-per-node={opts.tasks_per_node}", f"--gpus-per-node={opts.gpus_per_node}",
         f"--time={opts.time}", f"--output={sbatch_quote(log + '/%x-%j.out')}",
         f"--error={sbatch_quote(log + '/%x-%j.err')}", f"--chdir={sbatch_quote(opts.job_dir)}"]
    if opts.partition:
        d.append(f"--partition={sbatch_quote(opts.partition)}")
    if opts.account:
        d.append(f"--account={sbatch_quote(opts.account)}")
    if opts.exclusive:
        d.append("--exclusive")
    if opts.mem is not None:
        d.append(f"--mem={opts.mem}")
    if opts.after:
        d.append(f"--dependency={sbatch_quote('afterok:' + opts.after)}")
    if opts.requeue:
        # B: signal the batch shell, whose trap requeues; append: a requeued run keeps the log
        d += ["--requeue", "--open-mode=append", f"--signal=B:USR1@{opts.signal_seconds}"]
    return d


def _continued(words: Sequence[str], indent: str = "  ") -> str:
    return (" \\\n" + indent).join(shlex.quote(w) for w in words)


def render(opts: SlurmOptions, command: Sequence[str]) -> str:
    """The sbatch script that runs ``nemo-minitron COMMAND...`` on every task; ``opts`` as
    returned by :func:`validate`."""
    lines = ["#!/bin/bash", "# Written by nemo-minitron (nemo_minitron/launch/slurm.py)."]
    lines += [f"#SBATCH {d}" for d in directives(opts)]
    lines += ["", "# srun starts every rank (no torchrun): nemo_minitron.dist reads SLURM_PROCID, "
              "SLURM_LOCALID, SLURM_NTASKS, SLURM_NODELIST"]
    lines.append("unset PYTHONPATH  # the submitting host's; each task extends the image's own")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in job_env(opts)]
    lines.append("")
    run = " \\\n  ".join([_continued(srun_argv(opts)),
                         " ".join(shlex.quote(w) for w in job_argv(opts, command))])
    if not opts.requeue:
        lines.append(run)
    else:
        lines += [
            "# SIGUSR1 arrives --signal seconds before the end (time limit or preemption): requeue;",
            "# the recipe resumes from its newest checkpoint in the new run",
            "trap 'echo \"requeueing job $SLURM_JOB_ID\"; scontrol requeue \"$SLURM_JOB_ID\"' USR1",
            run + " &",
            "srun_pid=$!",
            "wait \"$srun_pid\"; status=$?",
            "# the trap interrupts wait: keep waiting until SLURM stops the step",
            "while kill -0 \"$srun_pid\" 2>/dev/null; do wait \"$srun_pid\"; status=$?; done",
            "exit \"$status\"",
        ]
    return "\n".join(lines) + "\n"


# ---- reading the job's parallel layout from its config -----------------------------------------
@dataclass(frozen=True)
class CommandSpec:
    """How ``nemo-minitron COMMAND`` reads its config: the config class and its TP/PP fields."""

    config_class: Callable[[], type]
    tp: str = "tp"
    pp: str = "pp"
    single_task: bool = False  # one process (conversion), not one per GPU
    kind: Optional[str] = None  # its shipped configs: nemo_minitron/conf/<kind>/


def _train_config(name):
    def get():
        from nemo_minitron.train import config

        return getattr(config, name)
    return get


def _job_config(name):
    def get():
        from nemo_minitron.inference import job

        return getattr(job, name)
    return get


def _prune_config():
    from nemo_minitron.prune.config import PruneConfig

    return PruneConfig


_TRAINER = dict(tp="trainer.tensor_model_parallel_size", pp="trainer.pipeline_model_parallel_size")
COMMANDS: Dict[str, CommandSpec] = {
    "finetune": CommandSpec(_train_config("FinetuneConfig"), kind="finetune", **_TRAINER),
    "distill": CommandSpec(_train_config("DistillConfig"), kind="distill", **_TRAINER),
    "prune": CommandSpec(_prune_config, kind="prune"),
    "generate": CommandSpec(_job_config("GenerateJobConfig"), kind="generate"),
    "eval-ppl": CommandSpec(_job_config("PerplexityJobConfig"), kind="generate"),
    "eval-harness": CommandSpec(_job_config("EvalHarnessJobConfig"), kind="generate"),
    "convert": CommandSpec(lambda: None, single_task=True),
}
# options of those commands that take a value (so the value is not read as key=value)
_VALUE_FLAGS = {"--config", "--model", "--data", "--out", "--teacher", "--student", "--prompt",
                "--prompts", "--max-new-tokens", "--tasks", "--host", "--port"}


def config_and_overrides(args: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """``--config`` and the ``key=value`` items of a command's arguments."""
    config, overrides, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            overrides += [x for x in args[i + 1:] if "=" in x]
            break
        if a in _VALUE_FLAGS:
            if a == "--config" and i + 1 < len(args):
                config = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif not a.startswith("-") and "=" in a:
            overrides.append(a)
        i += 1
    return config, overrides


def model_parallel_layout(command: str, args: Sequence[str], job_dir: str) -> Tuple[int, int]:
    """(TP, PP) of ``nemo-minitron COMMAND ARGS`` from its YAML and overrides, through the recipe
    config loader (so unknown keys and bad values fail here, before submission)."""
    from nemo_minitron.config.recipe import load_config

    spec = COMMANDS[command]
    cls = spec.config_class()
    if cls is None:
        return 1, 1
    config, overrides = config_and_overrides(args)
    if config and os.path.isfile(os.path.join(job_dir, config)):
        config = os.path.join(job_dir, config)
    # required fields (e.g. prune's model/out) may come from flags: any text stands in for them
    required = {f.name: "-" for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    cfg = load_config(cls, config, overrides, values=required, kind=spec.kind)
    return operator.attrgetter(spec.tp)(cfg), operator.attrgetter(spec.pp)(cfg)


def prepare(opts: SlurmOptions, command: Sequence[str]) -> SlurmOptions:
    """Validate the options for ``nemo-minitron COMMAND...`` and fill in its layout."""
    if not command or command[0] not in COMMANDS:
        raise ConfigError(f"unknown job {command[0] if command else ''!r}; one of: "
                          f"{', '.join(COMMANDS)}")
    for a in command:
        _no_newline("argument", a)
    opts = validate(opts)
    for flag, path in job_paths(command):
        opts = mount(opts, path, flag)
    if COMMANDS[command[0]].single_task:
        return dataclasses.replace(opts, nodes=1, ntasks_per_node=1, exclusive=False,
                                   gpus_per_node=min(opts.gpus_per_node, 1))
    tp, pp = model_parallel_layout(command[0], command[1:], opts.job_dir)
    world = opts.nodes * opts.tasks_per_node
    if world % (tp * pp):
        raise ConfigError(f"{opts.nodes} node(s) x {opts.tasks_per_node} tasks = {world} ranks is "
                          f"not a multiple of TP x PP = {tp} x {pp}")
    return dataclasses.replace(opts, model_parallel=tp)


# ---- submission ----------------------------------------------------------------------------------
def write_script(text: str, opts: SlurmOptions) -> str:
    """Write the script into the log directory (temporary name, then rename); returns its path."""
    try:
        os.makedirs(opts.log_dir, exist_ok=True)
    except OSError as e:
        raise MinitronError(f"--log-dir {opts.log_dir}: {e.strerror}") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", opts.job_name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=".sbatch", dir=opts.log_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        path = os.path.join(opts.log_dir, f"{name}-{stamp}-{secrets.token_hex(3)}.sbatch")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def sbatch(script: str) -> str:
    """``sbatch --parsable SCRIPT`` -> the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise MinitronError("sbatch not found on PATH (run on a SLURM login node, or print the "
                            "script with --dry-run)")
    p = subprocess.run([exe, "--parsable", script], capture_output=True, text=True)
    if p.returncode != 0:
        raise MinitronError(f"sbatch {script} failed (exit {p.returncode}): "
                            f"{(p.stderr or p.stdout).strip()}")
    job_id = p.stdout.strip().splitlines()[-1].split(";")[0] if p.stdout.strip() else ""
    if not _JOB_ID.match(job_id):
        raise MinitronError(f"sbatch printed {p.stdout.strip()!r}, not a job id")
    return job_id


def submit(opts: SlurmOptions, command: Sequence[str], dry_run: bool = False) -> str:
    """Render the job; print it (dry run) or write and submit it. Returns the script text or the
    job id."""
    spec = COMMANDS.get(command[0]) if command else None
    check_config(command, os.path.abspath(opts.job_dir or os.getcwd()), spec.kind if spec else None)
    opts = prepare(opts, command)
    text = render(opts, command)
    if dry_run:
        return text
    return sbatch(write_script(text, opts))


# ---- command line ----------------------------------------------------------------------------------
def add_arguments(p, nodes_default: int = 1) -> None:
    """The sbatch options shared by ``nemo-minitron slurm`` and ``pipeline``."""
    p.add_argument("--nodes", type=int, default=nodes_default, help="nodes per job")
    p.add_argument("--gpus-per-node", type=int, default=8, help="also the tasks per node")
    p.add_argument("--partition", help="sbatch --partition")
    p.add_argument("--account", help="sbatch --account")
    p.add_argument("--time", default="04:00:00", help="HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--container", default=DEFAULT_IMAGE, help=f"image (default {DEFAULT_IMAGE})")
    p.add_argument("--mounts", action="append", default=[],
                   help="SRC:DST[,SRC:DST...]; keep SRC == DST (the checkout, the job dir and the "
                        "directories of path arguments are mounted without asking)")
    p.add_argument("--job-name", help="sbatch --job-name (default: minitron-COMMAND)")
    p.add_argument("--log-dir", help="sbatch logs and scripts (default: slurm_logs)")
    p.add_argument("--job-dir", help="the job's working directory, where relative "
                   "paths are read (default: the current one)")
    p.add_argument("--after", help="job id that must succeed first (afterok)")
    p.add_argument("--requeue", action="store_true",
                   help="requeue on preemption / time limit; the recipe resumes from its checkpoint")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="with --requeue: seconds of warning before the end (default 300)")
    p.add_argument("--no-exclusive", dest="exclusive", action="store_false",
                   help="share the nodes (default: sbatch --exclusive)")
    p.add_argument("--mem", help="--mem of sbatch, e.g. 0 (all of the node's memory)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra export in the job")
    p.add_argument("--python", default="python", help="interpreter in the container")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")


def options_from_args(args, **extra) -> SlurmOptions:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SlurmOptions)
              if getattr(args, f.name, None) is not None}
    values.update(extra)
    return SlurmOptions(**values)


def split_at_dashes(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Everything after the first ``--`` belongs to the job, verbatim."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str]) -> int:
    """``nemo-minitron slurm COMMAND [sbatch options] [command args] [-- command args]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nemo-minitron slurm", allow_abbrev=False,
        description="Submit `nemo-minitron COMMAND ARGS` as an sbatch job (pyxis container, one "
                    "task per GPU); arguments not listed here, and all after `--`, go to COMMAND.")
    parser.add_argument("command", choices=sorted(COMMANDS), help="the job, e.g. finetune")
    add_arguments(parser)
    own, after_dashes = split_at_dashes(argv)
    args, rest = parser.parse_known_args(own)
    command = [args.command, *rest, *after_dashes]
    out = submit(options_from_args(args, job_name=args.job_name or f"minitron-{args.command}"),
                 command, dry_run=args.dry_run)
    print(out, end="" if args.dry_run else "\n")
    return 0
