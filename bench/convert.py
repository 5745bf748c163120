"""Conversion speed and memory on a full-size synthetic Llama-3.1-Minitron-4B-Width checkpoint.

    .venv/bin/python bench/convert.py [--workdir /tmp/bench_convert] [--preset minitron_4b_width] [--keep]

Builds a random bf16 HF checkpoint with the real shapes (~9 GB for 4B-Width; needs ~40 GB of free
disk for all outputs), then, in the same run:
  1. the baseline: copying the same shard bytes to a new directory;
  2. ``nemo-minitron convert hf-to-nemo`` (torch_dist, bf16);
  3. ``nemo-minitron convert nemo-to-hf``;
each as a fresh process, reporting wall time, the ratio to the copy, and peak RSS (the process and
its children, e.g. the forked dist_checkpointing writer). Finally the round trip is checked bit for
bit against the source. Goals (issue 3): <= 1.5x the copy time and <= 2 GB peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

RUNNER = r"""
import resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:])
wall = time.perf_counter() - t
# children and grandchildren only: this runner was forked from the benchmark process, whose
# (torch-sized) RSS its own ru_maxrss would carry across exec
kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("BENCH", proc.returncode, wall, kib * 1024, flush=True)
"""


def timed(cmd):
    """(wall seconds, peak RSS bytes over the command and its children) of a fresh process."""
    out = subprocess.run([sys.executable, "-c", RUNNER] + cmd, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("BENCH ")]
    if not line:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    _, code, wall, rss = line[-1].split()
    if int(code) != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}\n{out.stderr[-2000:]}")
    return float(wall), int(rss)


def make_checkpoint(preset: str, out_dir: str) -> int:
    import torch

    from nemo_minitron.checkpoint.hf_io import write_safetensors_shards
    from nemo_minitron.config import get_preset
    from nemo_minitron.config.hf import expected_hf_shapes, write_hf_config
    from nemo_minitron.tokenizer import write_tokenizer_files

    cfg = get_preset(preset)
    os.makedirs(out_dir)
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in expected_hf_shapes(cfg).items():
            yield name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    write_safetensors_shards(tensors(), out_dir, max_shard_bytes=5 * 10**9)
    write_hf_config(cfg, out_dir)
    write_tokenizer_files(out_dir)
    return sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)
               if f.endswith(".safetensors"))


def same_tensors(a: str, b: str) -> bool:
    from safetensors import safe_open

    from nemo_minitron.checkpoint.hf_io import read_weight_map

    wa, wb = read_weight_map(a), read_weight_map(b)
    if set(wa) != set(wb):
        return False
    for name in wa:
        with safe_open(os.path.join(a, wa[name]), "pt") as fa, \
                safe_open(os.path.join(b, wb[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not bool((x.view(-1) == y.view(-1)).all()):
                return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--preset", default="minitron_4b_width")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    os.makedirs(args.workdir)
    src, copy = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "copy")
    nemo, back = os.path.join(args.workdir, "model.nemo"), os.path.join(args.workdir, "back")
    try:
        t = time.perf_counter()
        size = make_checkpoint(args.preset, src)
        print(f"synthetic {args.preset}: {size / 1e9:.2f} GB of bf16 shards "
              f"({time.perf_counter() - t:.0f} s to make)", flush=True)
        script = ("import os, shutil; os.makedirs(%r); [shutil.copyfile(os.path.join(%r, f), "
                  "os.path.join(%r, f)) for f in sorted(os.listdir(%r)) "
                  "if f.endswith('.safetensors')]" % (copy, src, copy, src))
        copy_s, copy_rss = timed([sys.executable, "-c", script])
        cli = [sys.executable, "-m", "nemo_minitron.cli", "convert"]
        to_nemo_s, to_nemo_rss = timed(cli + ["hf-to-nemo", src, nemo])
        to_hf_s, to_hf_rss = timed(cli + ["nemo-to-hf", nemo, back])
        exact = same_tensors(src, back)
        rows = [("copy shard bytes", copy_s, copy_rss), ("hf-to-nemo", to_nemo_s, to_nemo_rss),
                ("nemo-to-hf", to_hf_s, to_hf_rss)]
        print(f"{'step':<18} {'wall s':>8} {'x copy':>7} {'peak RSS GB':>12}")
        for name, s, rss in rows:
            print(f"{name:<18} {s:>8.1f} {s / copy_s:>7.2f} {rss / 1e9:>12.2f}")
        print(f"round trip bit-identical: {exact}")
        print(json.dumps({"preset": args.preset, "bytes": size, "copy_s": copy_s,
                          "hf_to_nemo_s": to_nemo_s, "nemo_to_hf_s": to_hf_s,
                          "hf_to_nemo_peak_rss": to_nemo_rss, "nemo_to_hf_peak_rss": to_hf_rss,
                          "bit_identical": exact}))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
