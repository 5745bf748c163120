"""Packed rows on the CPU: the SDPA core attention with the dense ``[b, 1, s, s]`` mask (the
fallback) against segment ids (one causal attention per sample, no ``[s, s]`` tensor), forward +
backward of one attention module, in the same run, on the same q/k/v.

    .venv/bin/python bench/packing.py --out bench/results/packing_cpu_$(date +%F).json

Rows: samples of long-tailed length (log-uniform 32..1536 positions) packed first-fit into rows
of ``seq`` positions (data/training.py's ``pack``/``make_row``/``collate``), so each row holds
several samples and a padding tail. Heads: 8 query heads in 2 groups of head_dim 128 (Minitron-4B's
32/8 heads on one of 4 TP ranks), fp32. Each measurement runs in a forked child: step time is the
fastest of ``--reps`` forward+backward passes (the median too; the load average is recorded, as
other jobs on a shared CPU slow single passes), peak memory the child's max-RSS growth over the
passes (the CPU has no allocator statistics; torch's CPU SDPA kernel takes the boolean mask without
materializing ``[b, np, s, s]`` scores, so the dense path's extra memory is mainly the mask itself,
``dense_mask_mib``, and RSS growth is a coarse, allocator-dependent figure). Outputs and q/k/v gradients of the two paths are
compared; the JSON records the largest difference.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import random
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HEADS, GROUPS, HEAD_DIM = 8, 2, 128


def packed_segment_ids(seq: int, rows: int, seed: int):
    """``[rows, seq]`` segment ids of first-fit packed long-tailed samples (-1 on padding)."""
    import torch

    from nemo_minitron.data.training import Sample, collate, make_row, pack

    rng = random.Random(seed)
    samples = []
    while sum(len(s.prompt) + len(s.answer) - 1 for s in samples) < rows * seq * 1.1:
        n = min(seq, int(math.exp(rng.uniform(math.log(32), math.log(1536)))))
        samples.append(Sample(prompt=[1, 2], answer=list(range(3, n + 2))))
    groups = pack(samples, seq)[:rows]
    batch = collate([make_row(g, seq, pad_id=0) for g in groups])
    return batch["segment_ids"], [len(g) for g in groups], torch


def _measure(seq, rows, mode, reps, queue):
    import torch

    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_minitron.model.attention import SDPAttention
    from nemo_minitron.data.packing import SegmentMask

    seg, per_row, _ = packed_segment_ids(seq, rows, seed=0)
    b = seg.shape[0]
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM,
                               num_attention_heads=HEADS, num_query_groups=GROUPS,
                               kv_channels=HEAD_DIM, attention_dropout=0.0, hidden_dropout=0.0)
    att = SDPAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, b, HEADS, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(seq, b, GROUPS, HEAD_DIM, generator=g, requires_grad=True)
    v = torch.randn(seq, b, GROUPS, HEAD_DIM, generator=g, requires_grad=True)
    grad = torch.randn(seq, b, HEADS * HEAD_DIM, generator=g)
    seg_mask = SegmentMask(seg)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        # the dense path builds its [b, 1, s, s] mask each step, as the data did per micro batch
        mask = seg_mask.dense() if mode == "dense" else SegmentMask(seg)
        out = att(q, k, v, mask)
        out.backward(grad)
        times.append(time.perf_counter() - t0)
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    # plain pickle: tensors by value (multiprocessing's pickler shares fds that die with us)
    queue.put(pickle.dumps(dict(step_s=min(times), step_s_median=statistics.median(times), peak_rss_growth_mib=round(peak_mib, 1),
                   samples_per_row=per_row,
                   result=[t.detach().clone() for t in (out, q.grad, k.grad, v.grad)])))


def measure(seq, rows, mode, reps):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_measure, args=(seq, rows, mode, reps, queue))
    p.start()
    while True:  # a child killed (out of memory) sends nothing: say so instead of waiting forever
        try:
            res = pickle.loads(queue.get(timeout=5))
            break
        except queue_mod.Empty:
            if not p.is_alive():
                raise SystemExit(f"{mode} at seq={seq}: the child died (exit code {p.exitcode})")
    p.join()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="2048,4096")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    import torch

    report = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                  loadavg_start=os.getloadavg(),
                  heads=dict(query=HEADS, groups=GROUPS, head_dim=HEAD_DIM), dtype="float32",
                  rows=args.rows, reps=args.reps, runs=[])
    for seq in (int(s) for s in args.seqs.split(",")):
        dense = measure(seq, args.rows, "dense", args.reps)
        segments = measure(seq, args.rows, "segments", args.reps)
        diff = max(float((a - b).abs().max())
                   for a, b in zip(dense.pop("result"), segments.pop("result")))
        run = dict(seq=seq, samples_per_row=dense.pop("samples_per_row"), dense_mask=dense,
                   segments=dict((k, v) for k, v in segments.items() if k != "samples_per_row"),
                   speedup=round(dense["step_s"] / segments["step_s"], 2),
                   # what the dense path holds that the segment path does not: bool [b, 1, s, s]
                   dense_mask_mib=round(args.rows * seq * seq / 2 ** 20, 1),
                   max_abs_diff_out_and_grads=diff)
        print(json.dumps(run))
        report["runs"].append(run)
    report["loadavg_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
