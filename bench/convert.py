"""Conversion speed and memory on a full-size synthetic Llama-3.1-Minitron-4B-Width checkpoint.

    .venv/bin/python bench/convert.py [--workdir /tmp/bench_convert] [--preset minitron_4b_width]
        [--layers N] [--repeat R] [--profile DIR] [--keep]

Builds a random bf16 HF checkpoint with the real shapes (~9 GB for 4B-Width; needs ~20 GB of free
disk: source, copy, .nemo and the converted-back directory, each removed when no longer needed);
``--layers 4`` keeps the real widths with fewer layers (~2.5 GB) for cheap iteration. Then, in the
same run and ``--repeat`` times (the machine is shared: compare ratios within one run):
  1. the baseline: copying the same shard bytes to a new directory (``shutil.copyfile``);
  2. ``nemo-minitron convert hf-to-nemo`` (torch_dist, bf16);
  3. ``nemo-minitron convert nemo-to-hf``, preceded (for this checkout only) by a copy of the .nemo
     itself: the same bytes as the shards, copied while source, .nemo and copy fill the page
     cache as they do during nemo-to-hf (27 GB on a 24 GB machine at full size: the shard copy
     before the steps never runs under that pressure);
each as a fresh process, reporting wall time, its ratio to the copy and the CPU seconds of the
process tree (user + system; less sensitive to other load than wall time). Memory, sampled every
20 ms from /proc/PID/status over the process and its children (e.g. the forked writer), summed
over the tree:
  * ``anon``: peak anonymous and shared-anonymous memory (Pss_Anon + Pss_Shmem from
    smaps_rollup: a page shared by forked processes counts once) -- the memory the conversion
    really holds (heap, tensors, hf-to-nemo's shared buffers for merged tensors);
  * ``file``: peak file-backed resident pages (Pss_File): mmapped files (safetensors shards,
    shared libraries); clean page cache, which the kernel reclaims under pressure;
  * ``rss``: peak of RssAnon + RssFile + RssShmem summed over the processes, what ``top`` adds
    up (forked children's shared pages counted in each), and ``hwm``, the kernel's own peak
    (ru_maxrss of the largest process; between samples, too);
  * ``tmpfs``: peak growth of the machine's Shmem (shared buffers and scratch files in /dev/shm,
    so it overlaps ``anon``; other processes on the machine add noise).
``--profile DIR`` runs each conversion under cProfile and writes ``DIR/<step>.prof``. Finally the
round trip is checked bit for bit against the source. Goals (issue 3): <= 1.5x the copy time and
<= 2 GB peak memory.

The ``returned GB`` column: memory the VM handed back to its hypervisor during the step (Linux
free page reporting, ``/sys/module/page_reporting``; absent on bare metal). On the project's VMs
free memory is handed back within seconds, and touching a handed-back page again costs the guest
a host fault: measured 2-4x slower first touches, the main reason the same copy takes 3 to 10 s
from run to run. Compare ratios within one run. (An earlier version of this bench could switch the
reporting off as root, a kernel setting a benchmark should not write; what that measured is in
bench/results/convert_4b_cpu_2026-11-27_session5.txt.)

Measured results and how to read them: bench/results/README.md. ``--baseline-tree DIR``
(e.g. a ``git worktree`` of an older commit) times that checkout's converters in the same run,
before ours.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs the command, samples the memory of its process tree, prints one BENCH json line.
RUNNER = r"""
import json, os, resource, subprocess, sys, time

def tree(root):
    kids = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out

def sample(pids):
    tot = dict.fromkeys(("RssAnon", "RssFile", "RssShmem", "Pss_Anon", "Pss_File", "Pss_Shmem"), 0)
    for pid in pids:
        for name in ("status", "smaps_rollup"):
            try:
                with open(f"/proc/{pid}/{name}") as f:
                    for line in f:
                        key = line.split(":", 1)[0]
                        if key in tot:
                            tot[key] += int(line.split()[1]) * 1024
            except OSError:
                pass
    return tot

def shmem():
    with open("/proc/meminfo") as f:
        return [int(l.split()[1]) * 1024 for l in f if l.startswith("Shmem:")][0]

t = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
peak = {"anon": 0, "file": 0, "rss": 0, "tmpfs": 0}
shm0 = shmem()
while proc.poll() is None:
    s = sample(tree(proc.pid))
    # proportional set sizes: a page shared by forked processes counts once
    peak["anon"] = max(peak["anon"], s["Pss_Anon"] + s["Pss_Shmem"])
    peak["file"] = max(peak["file"], s["Pss_File"])
    peak["rss"] = max(peak["rss"], s["RssAnon"] + s["RssFile"] + s["RssShmem"])
    peak["tmpfs"] = max(peak["tmpfs"], shmem() - shm0)
    time.sleep(0.02)
wall = time.perf_counter() - t
# children and grandchildren only (this runner's own exec'd RSS is not counted)
use = resource.getrusage(resource.RUSAGE_CHILDREN)
peak["hwm"] = use.ru_maxrss * 1024
peak["cpu"] = use.ru_utime + use.ru_stime  # CPU seconds of the tree: less noisy than wall
print("BENCH", json.dumps({"code": proc.returncode, "wall": wall, **peak}), flush=True)
"""


PAGE_REPORTING = "/sys/module/page_reporting/parameters"


def returned_bytes():
    """Bytes of free memory the VM has handed back to its hypervisor so far, or None."""
    try:
        with open(os.path.join(PAGE_REPORTING, "reported_kib")) as f:
            return int(f.read()) * 1024
    except (OSError, ValueError):
        return None


def timed(cmd, env=None, cwd=None):
    """{"wall": seconds, "anon"/"file"/"rss"/"hwm": peak bytes, "returned": bytes handed back
    to the hypervisor meanwhile (None where the kernel does not report)} of a fresh process
    tree."""
    before = returned_bytes()
    out = subprocess.run([sys.executable, "-c", RUNNER] + cmd, capture_output=True, text=True,
                         env=env, cwd=cwd)
    after = returned_bytes()
    line = [l for l in out.stdout.splitlines() if l.startswith("BENCH ")]
    if not line:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    res = json.loads(line[-1][len("BENCH "):])
    res["returned"] = after - before if before is not None and after is not None else None
    if res.pop("code") != 0:
        raise SystemExit(f"{' '.join(cmd)} failed\n{out.stderr[-2000:]}")
    return res


def make_checkpoint(preset: str, out_dir: str, layers=None) -> int:
    import torch

    from nemo_minitron.checkpoint.hf_io import write_safetensors_shards
    from nemo_minitron.config import get_preset
    from nemo_minitron.config.hf import expected_hf_shapes, write_hf_config
    from nemo_minitron.tokenizer import write_tokenizer_files

    cfg = get_preset(preset)
    if layers:
        cfg = cfg.replace(num_layers=layers)
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
    parser.add_argument("--layers", type=int, default=None,
                        help="real widths, this many layers (e.g. 4: ~2.5 GB)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", default=None, help="write cProfile stats into this directory")
    parser.add_argument("--format", default="torch_dist", choices=("torch_dist", "legacy"))
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--baseline-tree", default=None,
                        help="also time the converters of another checkout of this repository "
                             "(e.g. `git worktree add /tmp/old <commit>`), in the same run")
    args = parser.parse_args()
    if os.path.exists(args.workdir):
        shutil.rmtree(args.workdir)
    os.makedirs(args.workdir)
    src, copy = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "copy")
    nemo, back = os.path.join(args.workdir, "model.nemo"), os.path.join(args.workdir, "back")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    try:
        t = time.perf_counter()
        size = make_checkpoint(args.preset, src, args.layers)
        label = args.preset + (f" ({args.layers} layers)" if args.layers else "")
        print(f"synthetic {label}: {size / 1e9:.2f} GB of bf16 shards "
              f"({time.perf_counter() - t:.0f} s to make)", flush=True)
        script = ("import os, shutil; os.makedirs(%r); [shutil.copyfile(os.path.join(%r, f), "
                  "os.path.join(%r, f)) for f in sorted(os.listdir(%r)) "
                  "if f.endswith('.safetensors')]" % (copy, src, copy, src))

        nemo_copied = os.path.join(args.workdir, "copy.nemo")
        nemo_copy = "import shutil; shutil.copyfile(%r, %r)" % (nemo, nemo_copied)

        def cli(step):
            prof = ["-m", "cProfile", "-o", os.path.join(args.profile, step + ".prof")] \
                if args.profile else []
            return [sys.executable] + prof + ["-m", "nemo_minitron.cli", "convert", step]

        runs = []
        for r in range(args.repeat):
            shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(back, ignore_errors=True)
            row = {"copy shard bytes": timed([sys.executable, "-c", script])}
            shutil.rmtree(copy)  # keep the disk footprint at source + .nemo + back
            # ours last: the round-trip check below reads its output. Each tree's converters
            # run from that tree (`python -m` puts the working directory first on sys.path)
            trees = [("", ROOT)]
            if args.baseline_tree:
                trees.insert(0, (" (baseline)", os.path.abspath(args.baseline_tree)))
            for tag, tree in trees:  # the output never pre-exists: no old .nemo to unlink
                path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree] + path))
                shutil.rmtree(back, ignore_errors=True)
                if os.path.exists(nemo):
                    os.remove(nemo)
                row["hf-to-nemo" + tag] = timed(cli("hf-to-nemo") + [src, nemo, "--format",
                                                                     args.format], env, tree)
                if not tag:  # a copy of the same bytes while source and .nemo fill the cache
                    row["copy the .nemo"] = timed([sys.executable, "-c", nemo_copy])
                    os.remove(nemo_copied)
                row["nemo-to-hf" + tag] = timed(cli("nemo-to-hf") + [nemo, back], env, tree)
            # the VM's copy speed drifts (page cache, neighbours): measured again after them
            row["copy again"] = timed([sys.executable, "-c", script])
            shutil.rmtree(copy)
            runs.append(row)
            print(f"run {r + 1}/{args.repeat}: {'step':<28} {'wall s':>7} {'x copy':>7} "
                  f"{'cpu s':>6} {'anon GB':>8} {'file GB':>8} {'rss GB':>7} {'hwm GB':>7} "
                  f"{'tmpfs GB':>8} {'returned GB':>11}")
            copy_s = (row["copy shard bytes"]["wall"] + row["copy again"]["wall"]) / 2
            for name, m in row.items():
                back_gb = "-" if m["returned"] is None else f"{m['returned'] / 1e9:.2f}"
                print(f"{'':<11}{name:<28} {m['wall']:>7.1f} "
                      f"{m['wall'] / copy_s:>7.2f} {m['cpu']:>6.1f} "
                      f"{m['anon'] / 1e9:>8.2f} {m['file'] / 1e9:>8.2f} {m['rss'] / 1e9:>7.2f} "
                      f"{m['hwm'] / 1e9:>7.2f} {m['tmpfs'] / 1e9:>8.2f} "
                      f"{back_gb:>11}", flush=True)
            n2h = row["nemo-to-hf"]["wall"] / row["copy the .nemo"]["wall"]
            print(f"{'':<11}nemo-to-hf / copy the .nemo (same page-cache load): {n2h:.2f}",
                  flush=True)
        exact = same_tensors(src, back)
        print(f"round trip bit-identical: {exact}")
        print(json.dumps({"preset": args.preset, "layers": args.layers, "bytes": size,
                          "format": args.format, "runs": runs, "bit_identical": exact}))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
