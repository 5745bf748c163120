"""``nemo-minitron demo``: the whole pipeline on the embedded tiny family, on a CPU, in minutes.

    nemo-minitron demo                          # ./demo_out; about 2-3 minutes on 2 idle cores
    nemo-minitron demo --workdir /tmp/d --quick # fewer steps and samples (the test runs this)
    nemo-minitron demo --steps 50 --keep        # longer distillation; keep training checkpoints

Stages (``STAGES``, in order; each returns its key numbers and its outputs):

    teacher     a tiny random Llama-3.1-family teacher written like the released HF repos
    convert     HF -> teacher.nemo (torch_dist, bf16)
    inspect     parameters, padded vocabulary, ``nemo-minitron inspect``'s diagnoses (must be OK)
    generate    greedy completion of a prompt by the .nemo with Megatron-Core (tokens/s)
    prune       Minitron width pruning to the 4B-Width-shaped tiny student (shipped config prune/tiny)
    distill     N steps of logit distillation (shipped config distill/tiny; held-out KL before/after)
    lora_finetune  N steps of LoRA SFT of the student on pydoc Q/A pairs (adapters only)
    lora_merge  student + adapter -> .nemo (the model that is exported and verified)
    export      the student .nemo -> HF (nemo-to-hf)
    verify      the student .nemo's Megatron logits vs transformers on the export (max |dlogit|)
    perplexity  teacher vs student on Python's documentation

Process model: a stage that initializes torch.distributed (generate, prune, distill, perplexity)
runs in a fresh ``python -m nemo_minitron.cli ...`` / ``python -m nemo_minitron.demo --task ...``
process (a process that has used torch.distributed must not fork gloo writers later, see
nemo_minitron/convert/io.py; this one never initializes it). The others run in this process; the
converters and ``verify`` fork their own one-rank children as they do from the command line. With a
TTY the fresh processes print to it (progress bars included); otherwise their output goes to
``WORKDIR/logs/<stage>.log``, whose tail is shown if the stage fails.

The workdir holds a marker file; an existing workdir is replaced only if it has that marker (never
user data). Without ``--keep`` the training checkpoints (``*.ckpt``) are removed at the end.
Results: a summary table on stdout and in ``WORKDIR/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from nemo_minitron.config.recipe import shipped_configs
from nemo_minitron.errors import MinitronError

MARKER = ".nemo-minitron-demo"
TEACHER_PRESET = "tiny_llama31"
PROMPT = "The assert statement"
PPL_WINDOW, PPL_STRIDE = 128, 64
VERIFY_ATOL = 1e-3  # fp32 logits of the same bf16 weights: differences are summation order only


class DemoError(MinitronError):
    """A demo stage failed (the message names it) or the workdir cannot be used."""


def shipped_config(key: str) -> str:
    """The path of a YAML config shipped in the package (``"prune/tiny"``)."""
    return shipped_configs()[key]


@dataclass
class DemoOptions:
    workdir: str = "demo_out"
    quick: bool = False
    keep: bool = False
    steps: Optional[int] = None  # distillation steps (default 10, --quick 2)

    @property
    def distill_steps(self) -> int:
        return self.steps if self.steps is not None else (2 if self.quick else 10)


@dataclass
class Context:
    """What the stages share: options, where things go, and the current model (.nemo)."""

    opts: DemoOptions
    workdir: str
    tty: bool
    paths: Dict[str, str] = field(default_factory=dict)
    model: str = ""  # the .nemo the next stage works on (updated by convert, prune, distill, ...)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)


@dataclass
class StageResult:
    numbers: Dict[str, str]  # label -> formatted value, in display order
    outputs: List[str] = field(default_factory=list)


@dataclass
class Stage:
    name: str
    run: Callable[[Context], StageResult]
    what: str
    needs_transformers: bool = False  # text prompts/data (tokenizer) or the transformers model


# ---- running things in fresh processes ------------------------------------------------------
def run_fresh(ctx: Context, stage: str, module: str, args: List[str]) -> None:
    """``python -m module args`` in a fresh one-rank process; output to the TTY or the stage log."""
    from nemo_minitron.convert.io import single_process_env
    from nemo_minitron.lifecycle import child_env

    cmd = [sys.executable, "-m", module] + [str(a) for a in args]
    log = os.path.join(ctx.workdir, "logs", f"{stage}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    if ctx.tty:
        code = subprocess.run(cmd, env=child_env(single_process_env())).returncode
        detail = "see its output above"
    else:
        with open(log, "w") as f:
            code = subprocess.run(cmd, env=child_env(single_process_env()), stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        with open(log, errors="replace") as f:
            tail = [line.rstrip() for line in f if line.strip()][-5:]
        detail = f"log {log}; last lines:\n    " + "\n    ".join(tail)
    if code != 0:
        shown = " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd))
        raise DemoError(f"`{shown}` exited with status {code} ({detail})")


def run_task(ctx: Context, stage: str, task: str, **kwargs):
    """A ``TASKS`` function in a fresh process (``python -m nemo_minitron.demo --task``); its
    JSON result."""
    out = os.path.join(ctx.workdir, "logs", f"{stage}.result.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    run_fresh(ctx, stage, "nemo_minitron.demo", ["--task", task, json.dumps(kwargs), out])
    with open(out) as f:
        return json.load(f)


def _params(path: str) -> int:
    from nemo_minitron.config.resolve import resolve_config

    return resolve_config(path)[0].num_params()


def _size_mb(path: str) -> str:
    if os.path.isfile(path):
        total = os.path.getsize(path)
    else:
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return f"{total / 1e6:.1f} MB"


# ---- the stages -----------------------------------------------------------------------------
def stage_teacher(ctx: Context) -> StageResult:
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config.presets import get_preset

    out = write_tiny_hf_checkpoint(ctx.path("teacher_hf"), TEACHER_PRESET, seed=0)
    ctx.paths["teacher_hf"] = out
    cfg = get_preset(TEACHER_PRESET)
    return StageResult({"preset": TEACHER_PRESET, "params": f"{cfg.num_params():,}",
                        "dtype": cfg.dtype, "size": _size_mb(out)}, [out])


def stage_convert(ctx: Context) -> StageResult:
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    out = hf_to_nemo(ctx.paths["teacher_hf"], ctx.path("teacher.nemo"), dtype="bf16")
    ctx.paths["teacher_nemo"] = ctx.model = out
    return StageResult({"format": "torch_dist bf16", "size": _size_mb(out)}, [out])


def stage_inspect(ctx: Context) -> StageResult:
    from nemo_minitron.convert.inspect import inspect_path

    report = inspect_path(ctx.model)
    if report.problems:
        raise DemoError(f"{ctx.model}: {len(report.problems)} problem(s): "
                        + "; ".join(report.problems))
    cfg = report.cfg
    return StageResult({"params": f"{cfg.num_params():,}",
                        "padded vocab": f"{cfg.padded_vocab_size(1)} (TP1)",
                        "head_dim": str(cfg.head_dim), "diagnosis": "OK"})


def stage_generate(ctx: Context) -> StageResult:
    n = 8 if ctx.opts.quick else 16
    r = run_task(ctx, "generate", "generate", model=ctx.model, prompt=PROMPT, max_new_tokens=n)
    text = " ".join(r["text"].split())
    return StageResult({"prompt": repr(PROMPT), "completion": repr(text[:40]),
                        "tokens": str(r["tokens"]),
                        "tokens/s": f"{r['tokens'] / max(r['seconds'], 1e-9):.1f}"})


def stage_prune(ctx: Context) -> StageResult:
    out = ctx.path("student.nemo")
    calib = ["calib_samples=8"] if ctx.opts.quick else []
    run_fresh(ctx, "prune", "nemo_minitron.cli",
              ["prune", "--config", shipped_config("prune/tiny"), "--model",
               ctx.model, "--out", out, "overwrite=true"] + calib)
    before, after = _params(ctx.model), _params(out)
    ctx.paths["student_nemo"] = ctx.model = out
    return StageResult({"params before": f"{before:,}", "after": f"{after:,}",
                        "kept": f"{after / before:.1%}"}, [out])


def stage_distill(ctx: Context) -> StageResult:
    out = ctx.path("student_distilled.nemo")
    steps = ctx.opts.distill_steps
    overrides = [f"trainer.max_steps={steps}", "trainer.val_check_interval=0",
                 "trainer.ckpt_every_n_steps=0", f"trainer.log_every_n_steps={max(1, steps // 5)}",
                 f"trainer.progress_bar={str(ctx.tty).lower()}", "model.global_batch_size=4",
                 f"data.val_samples={8 if ctx.opts.quick else 16}"]
    r = run_task(ctx, "distill", "distill", argv=[
        "--config", shipped_config("distill/tiny"), "--teacher",
        ctx.paths["teacher_nemo"], "--student", ctx.model, "--data", "pydoc", "--out", out,
        "--overwrite"] + overrides)
    ctx.paths["distilled_nemo"] = ctx.model = out
    return StageResult({"steps": str(steps), "held-out KL before": f"{r['before']['kl']:.4f}",
                        "after": f"{r['after']['kl']:.4f}",
                        "s/step": f"{r['seconds_per_step']:.2f}"}, [out])


def _train_losses(out: str) -> str:
    """'first -> last' training loss from a recipe's metrics.csv (in ``<out>.ckpt/logs``)."""
    import csv

    from nemo_minitron.train.loop import default_ckpt_dir

    path = os.path.join(default_ckpt_dir(out), "logs", "metrics.csv")
    with open(path, newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"]
    return f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"


def stage_lora_finetune(ctx: Context) -> StageResult:
    """LoRA SFT of the distilled student .nemo (shipped config finetune/tiny_lora), adapters only."""
    from pydoc_data.topics import topics

    data = ctx.path("sft.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for key in sorted(topics)[:64]:
            f.write(json.dumps({"input": f"Describe Python's {key}.",
                                "output": " ".join(topics[key].split()[:20])}) + "\n")
    out, adapter = ctx.path("student_lora.nemo"), ctx.path("student_lora.lora")
    steps = ctx.opts.distill_steps
    run_fresh(ctx, "lora_finetune", "nemo_minitron.cli",
              ["finetune", "--peft", "lora", "--config",
               shipped_config("finetune/tiny_lora"), "--model", ctx.model, "--data",
               data, "--out", out, f"lora.adapter_dir={adapter}", "lora.merge=false",
               f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1",
               f"trainer.progress_bar={str(ctx.tty).lower()}"])
    ctx.paths["lora_adapter"] = adapter
    return StageResult({"steps": str(steps), "SFT loss": _train_losses(out),
                        "adapter": _size_mb(adapter)}, [adapter])


def stage_lora_merge(ctx: Context) -> StageResult:
    """Merge the adapter into the student .nemo (``nemo-minitron lora merge``)."""
    out = ctx.path("student_merged.nemo")
    run_fresh(ctx, "lora_merge", "nemo_minitron.cli",
              ["lora", "merge", "--base", ctx.model, "--adapter", ctx.paths["lora_adapter"],
               "--out", out])
    ctx.paths["merged_nemo"] = ctx.model = out
    return StageResult({"params": f"{_params(out):,}"}, [out])


def stage_export(ctx: Context) -> StageResult:
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    out, layout = nemo_to_hf(ctx.model, ctx.path("student_hf"))
    ctx.paths["student_hf"] = out
    return StageResult({"from": f"{os.path.basename(ctx.model)} ({layout})",
                        "size": _size_mb(out)}, [out])


def transformers_missing() -> str:
    """Why the demo cannot run here ('' when it can): its text stages tokenize with transformers
    and ``verify`` runs the export with it; the family needs transformers >= 4.45."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed (pip install 'transformers>=4.45')"
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.45"):
        return (f"transformers {transformers.__version__} cannot read head_dim / llama3 RoPE "
                "(pip install 'transformers>=4.45')")
    return ""


def stage_verify(ctx: Context) -> StageResult:
    from nemo_minitron.inference.verify import verify

    if not ctx.tty:  # transformers' weight-loading bar would go to a log or a pipe
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    results = verify(ctx.paths["student_hf"], ctx.model)
    worst = max(r.max_abs_diff for r in results)
    tokens = sum(r.tokens for r in results)
    top1 = sum(r.top1_agreement * r.tokens for r in results) / tokens
    if worst > VERIFY_ATOL:
        raise DemoError(f"max |delta logit| {worst:.3e} > {VERIFY_ATOL:g} between "
                        f"{ctx.model} and {ctx.paths['student_hf']}")
    return StageResult({"max |dlogit|": f"{worst:.2e}", "top-1 agreement": f"{top1:.2%}",
                        "tokens": str(tokens)})


def stage_perplexity(ctx: Context) -> StageResult:
    from pydoc_data.topics import topics

    doc = ctx.path("pydoc_while.txt")
    with open(doc, "w", encoding="utf-8") as f:
        f.write(topics["while"])
    r = run_task(ctx, "perplexity", "perplexity", data=doc,
                 models=[ctx.paths["teacher_hf"], ctx.paths["student_hf"]])
    return StageResult({"teacher ppl": f"{r[0]['ppl']:.4g}", "student ppl": f"{r[1]['ppl']:.4g}",
                        "tokens": str(r[0]["tokens"])}, [doc])


STAGES: List[Stage] = [
    Stage("teacher", stage_teacher, "a tiny random Llama-3.1 teacher, HF layout"),
    Stage("convert", stage_convert, "HF -> .nemo"),
    Stage("inspect", stage_inspect, "architecture and diagnoses of the .nemo"),
    Stage("generate", stage_generate, "greedy completion with Megatron-Core", True),
    Stage("prune", stage_prune, "Minitron width pruning to the 4B-Width shape"),
    Stage("distill", stage_distill, "logit distillation from the teacher", True),
    Stage("lora_finetune", stage_lora_finetune, "LoRA SFT of the student", True),
    Stage("lora_merge", stage_lora_merge, "student + adapter -> .nemo"),
    Stage("export", stage_export, ".nemo -> HF"),
    Stage("verify", stage_verify, "Megatron vs transformers logits", True),
    Stage("perplexity", stage_perplexity, "teacher vs student on Python's documentation", True),
]


# ---- tasks: stage work that runs in a fresh process -----------------------------------------
def task_generate(model: str, prompt: str, max_new_tokens: int) -> dict:
    """Greedy completion; only the generation itself is timed (not loading)."""
    from nemo_minitron.inference import job
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.sampling import SamplingParams
    from nemo_minitron.model.source import ModelSource
    from nemo_minitron.tokenizer import load_tokenizer

    with ModelSource(model) as source:  # an HF directory or a .nemo, read natively
        tokenizer = load_tokenizer(source.tokenizer_dir)
        runner = job.setup(source, tp=1, pp=1, dtype="float32")
        try:
            start = time.perf_counter()
            out = generate(runner, [tokenizer.encode(prompt)],
                           SamplingParams(greedy=True, max_new_tokens=max_new_tokens,
                                          ignore_eos=True), tokenizer=tokenizer)[0]
            seconds = time.perf_counter() - start
        finally:
            job.cleanup()
    return {"text": out.text, "tokens": len(out.tokens), "seconds": seconds}


def task_distill(argv: List[str]) -> dict:
    """recipes/distill.py with the held-out KL measured before the first step too."""
    from nemo_minitron.recipes import distill

    seen = {}

    def before_fit(trainer):
        trainer.validate()
        seen.update(trainer=trainer, before=dict(trainer.last_val_metrics))

    if distill.main(argv, before_fit=before_fit) != 0:
        raise DemoError("nemo-minitron distill failed")
    trainer = seen["trainer"]
    times = [h["step_time_s"] for h in trainer.state.history]
    return {"before": seen["before"], "after": dict(trainer.last_val_metrics),
            "seconds_per_step": sum(times) / max(1, len(times))}


def task_perplexity(models: List[str], data: str) -> List[dict]:
    import io

    from nemo_minitron.inference.job import PerplexityJobConfig, run_perplexity

    results = []
    for model in models:
        r = run_perplexity(PerplexityJobConfig(model=model, data=data, dtype="float32",
                                               window=PPL_WINDOW, stride=PPL_STRIDE),
                           stdout=io.StringIO())
        results.append({"ppl": r.ppl, "nll_per_token": r.mean_nll, "tokens": r.tokens})
    return results


TASKS = {"generate": task_generate, "distill": task_distill, "perplexity": task_perplexity}


def task_main(argv: List[str]) -> int:
    """``python -m nemo_minitron.demo --task NAME KWARGS_JSON OUT_JSON`` (run by the demo)."""
    from nemo_minitron.compat import quiet_fallback_warnings

    quiet_fallback_warnings()
    _, name, kwargs, out = argv
    try:
        from nemo_minitron import lifecycle

        lifecycle.die_with_launcher()  # this stage dies with the demo
        result = TASKS[name](**json.loads(kwargs))
    except MinitronError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out)
    return 0


# ---- the driver ---------------------------------------------------------------------------
def check_workdir(path: str) -> str:
    """``path`` as an absolute path if the demo may use it: absent, empty, or a previous demo's."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise DemoError(f"--workdir {path} exists and is not a directory")
        if os.listdir(path) and not os.path.isfile(os.path.join(path, MARKER)):
            raise DemoError(f"--workdir {path} exists, is not empty and is not a previous demo "
                            f"directory (no {MARKER} file): choose another --workdir")
    return path


def prepare_workdir(path: str) -> str:
    """Create ``path`` (or replace a previous demo's); refuse anything else that is not empty."""
    path = check_workdir(path)
    if os.path.isfile(os.path.join(path, MARKER)):
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write("written by `nemo-minitron demo`; the demo replaces this directory on its "
                "next run\n")
    return path


def format_summary(rows: List[dict]) -> str:
    table = [("stage", "seconds", "key numbers", "output")]
    for r in rows:
        numbers = r["status"] if r["status"] != "ok" else \
            ", ".join(f"{k} {v}" for k, v in r["numbers"].items())
        out = ", ".join(os.path.relpath(p) for p in r["outputs"]) or "-"
        table.append((r["stage"], f"{r['seconds']:.1f}", numbers, out))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = [f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}"
             for row in table]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def run_demo(opts: DemoOptions, stages: Optional[List[Stage]] = None, stdout=None) -> List[dict]:
    """Run the stages; print a line per stage and the summary table; return the table's rows.
    Raises :class:`DemoError` naming the first stage that fails (after printing the table)."""
    stdout = stdout or sys.stdout
    stages = STAGES if stages is None else stages
    if opts.steps is not None and opts.steps < 1:
        raise DemoError(f"--steps {opts.steps} must be >= 1")
    check_workdir(opts.workdir)
    missing = transformers_missing() if any(s.needs_transformers for s in stages) else ""
    if missing:  # before any work (the NeMo 24.05 container ships transformers 4.40)
        raise DemoError(f"the demo needs transformers >= 4.45 (prompts, text data, verify): "
                        f"{missing}")
    ctx = Context(opts=opts, workdir=prepare_workdir(opts.workdir), tty=sys.stdout.isatty())

    def say(text):
        stdout.write(text + "\n")
        stdout.flush()

    rows, failure, start = [], None, time.perf_counter()
    for i, stage in enumerate(stages, 1):
        label = f"[demo {i}/{len(stages)}] {stage.name}"
        say(f"{label}: {stage.what} ...")
        t0 = time.perf_counter()
        try:
            result = stage.run(ctx)
        except Exception as e:  # noqa: BLE001 - any failure ends the demo, naming the stage
            failure = DemoError(f"demo stage '{stage.name}' failed: {e}")
            result = StageResult({})
        seconds = time.perf_counter() - t0
        status = "FAILED" if failure else "ok"
        rows.append(dict(stage=stage.name, seconds=seconds, status=status,
                         numbers=result.numbers, outputs=result.outputs))
        say(f"{label}: {status if status != 'ok' else 'done'} in {seconds:.1f} s "
            f"(elapsed {time.perf_counter() - start:.1f} s)")
        if failure:
            break
    if not opts.keep and not failure:
        for name in os.listdir(ctx.workdir):
            if name.endswith(".ckpt"):  # training checkpoints (the outputs are complete)
                shutil.rmtree(os.path.join(ctx.workdir, name), ignore_errors=True)
    total = time.perf_counter() - start
    with open(ctx.path("summary.json"), "w") as f:
        json.dump({"stages": rows, "total_seconds": total, "quick": opts.quick,
                   "distill_steps": opts.distill_steps}, f, indent=2)
    say("")
    say(format_summary(rows))
    say(f"total {total:.1f} s; results in {ctx.workdir}")
    if failure:
        raise failure
    return rows


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="demo_out",
                   help="output directory (default ./demo_out); a previous demo's is replaced, "
                        "anything else that is not empty is refused")
    p.add_argument("--quick", action="store_true",
                   help="fewer distillation steps, calibration and validation samples (~1-2 min)")
    p.add_argument("--keep", action="store_true",
                   help="keep the training checkpoints (*.ckpt) in the workdir")
    p.add_argument("--steps", type=int, default=None,
                   help="distillation steps (default 10; --quick: 2)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--task"]:
        sys.exit(task_main(sys.argv[1:]))
    sys.exit("usage: nemo-minitron demo (python -m nemo_minitron.demo is for --task only)")
