"""Start-up of a distillation job given .nemo teacher and student: the seconds from the command's
start to the end of its first training step, and the bytes its processes write, for this checkout
and a baseline checkout in the same run (``--baseline-tree``: e.g. ``git archive OLD | tar -x -C
DIR``; issue 16 compared the temporary-HF-copy jobs with the native .nemo reading).

    python bench/distill_startup.py --baseline-tree /tmp/before --workdir /tmp/bench_distill

The models are synthetic Llama-3.1-family checkpoints with the real vocabulary (128256) and
head_dim 128, narrower than the real ones so that a teacher, a student and the student's Adam
state fit twice over on a 24 GB machine (``--teacher-hidden/--student-hidden/--layers``). Both
are written as HF directories and converted to .nemo by this checkout once; each run is then
``torchrun --nproc-per-node N -m nemo_minitron.cli distill --config tiny --teacher T.nemo
--student S.nemo ... trainer.max_steps=1`` at TP=N, with ``TMPDIR`` pointed at a fresh directory.

Reported per tree: ``first_step_s`` (until the first train row appears in the run's
metrics.csv), ``wall_s``, ``written_bytes`` (the sum of ``write_bytes`` of every process of the job:
what reached the disk, the final output and checkpoint included), ``output_bytes`` (what the run
leaves: output + checkpoint directory) and ``scratch_peak_bytes`` (the largest size reached by
``TMPDIR`` plus the temporary entries beside the output: what is written and thrown away).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _du(path: str) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(directory, f)).st_size
            except OSError:
                pass
    return total


def make_models(workdir: str, layers: int, teacher_hidden: int, student_hidden: int) -> tuple:
    sys.path.insert(0, ROOT)
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config import get_preset

    base = get_preset("llama31_8b")
    shapes = {"teacher": (teacher_hidden, 7 * teacher_hidden // 2, 0),
              "student": (student_hidden, 3 * student_hidden, 1)}
    paths = []
    for name, (hidden, ffn, seed) in shapes.items():
        nemo = os.path.join(workdir, f"{name}.nemo")
        if not os.path.exists(nemo):
            cfg = base.replace(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                               num_attention_heads=max(2, hidden // 64), num_query_groups=2,
                               head_dim=128)
            hf = write_tiny_hf_checkpoint(os.path.join(workdir, f"{name}_hf"), cfg, seed=seed,
                                          dtype="bfloat16", overwrite=True)
            subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "convert", "hf-to-nemo", hf,
                            "--out", nemo], check=True, cwd=ROOT)
            shutil.rmtree(hf)
        paths.append(nemo)
    return tuple(paths)


def run_job(tree: str, label: str, workdir: str, teacher: str, student: str, nproc: int) -> dict:
    run_dir = os.path.join(workdir, label)
    shutil.rmtree(run_dir, ignore_errors=True)
    tmp = os.path.join(run_dir, "tmp")
    os.makedirs(tmp)
    out = os.path.join(run_dir, "out", "distilled.nemo")
    os.makedirs(os.path.dirname(out))
    env = dict(os.environ, PYTHONPATH=tree, TMPDIR=tmp, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "-m", "nemo_minitron.cli", "distill", "--config", os.path.join(
               tree, "nemo_minitron", "conf", "distill", "tiny.yaml") if os.path.isdir(
               os.path.join(tree, "nemo_minitron", "conf")) else os.path.join(
               tree, "conf", "distill", "tiny.yaml"),
           "--teacher", teacher, "--student", student, "--data", "pydoc", "--out", out,
           "trainer.max_steps=1", f"trainer.tensor_model_parallel_size={nproc}",
           "data.seq_length=128", "model.micro_batch_size=1", "model.global_batch_size=1",
           "trainer.log_every_n_steps=1"]
    metrics = out + ".ckpt/logs/metrics.csv"
    start = time.monotonic()
    job = psutil.Popen(cmd, env=env, cwd=run_dir, stdout=open(os.path.join(run_dir, "log"), "w"),
                       stderr=subprocess.STDOUT)
    written, first_step, scratch_peak = {}, None, 0
    while job.poll() is None:
        for p in [job] + job.children(recursive=True):
            try:
                written[p.pid] = p.io_counters().write_bytes
            except (psutil.Error, OSError):
                pass
        scratch = _du(tmp) + sum(_du(os.path.join(os.path.dirname(out), n)) for n in
                                 os.listdir(os.path.dirname(out)) if ".tmp-" in n or ".hf-" in n
                                 or ".staging-" in n)
        scratch_peak = max(scratch_peak, scratch)
        if first_step is None and os.path.isfile(metrics):
            with open(metrics) as f:
                if any(r.get("split") == "train" for r in csv.DictReader(f)):
                    first_step = time.monotonic() - start
        time.sleep(0.1)
    wall = time.monotonic() - start
    if job.returncode != 0:
        tail = open(os.path.join(run_dir, "log")).read()[-2000:]
        raise SystemExit(f"{label}: distill failed (rc {job.returncode}):\n{tail}")
    return {"tree": tree, "first_step_s": round(first_step or wall, 2), "wall_s": round(wall, 2),
            "written_bytes": sum(written.values()),
            "output_bytes": _du(os.path.dirname(out)),
            "scratch_peak_bytes": scratch_peak,
            "left_in_tmp": sorted(os.listdir(tmp))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-tree", required=True, help="the checkout to compare with")
    p.add_argument("--workdir", default="/tmp/bench_distill_startup")
    p.add_argument("--nproc", type=int, default=2, help="ranks (TP) of each job")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=2048)
    p.add_argument("--student-hidden", type=int, default=1024)
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    teacher, student = make_models(args.workdir, args.layers, args.teacher_hidden,
                                   args.student_hidden)
    sizes = {"teacher_nemo_bytes": os.path.getsize(teacher),
             "student_nemo_bytes": os.path.getsize(student)}
    results = {"models": sizes, "nproc": args.nproc}
    for label, tree in (("baseline", os.path.abspath(args.baseline_tree)), ("this", ROOT)):
        results[label] = run_job(tree, label, args.workdir, teacher, student, args.nproc)
        print(label, json.dumps(results[label]), flush=True)
    b, t = results["baseline"], results["this"]
    results["ratio_first_step"] = round(t["first_step_s"] / b["first_step_s"], 3)
    results["scratch_peak_gb"] = {"baseline": round(b["scratch_peak_bytes"] / 1e9, 3),
                                  "this": round(t["scratch_peak_bytes"] / 1e9, 3)}
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
