"""Does fusing the local spec's pointwise work pay? Forward + backward of a GPTModel (the local
spec, the SDPA core attention, as on a GPU without Transformer Engine), in the same run, on the
same weights and tokens, with:

* ``eager``: the local spec as built (RMSNorm, SwiGLU and RoPE each a few unfused ops);
* ``megatron_swiglu``: Megatron's own fused SwiGLU (``bias_activation_fusion``: its
  ``bias_swiglu_impl``, compiled by ``megatron.core.jit.jit_fuser``, which runs without apex/TE);
* ``compile_pointwise``: that, plus ``torch.compile`` of every RMSNorm and of Megatron's
  ``apply_rotary_pos_emb`` (what the issue names: norm / SwiGLU / RoPE);
* ``compile_layers``: ``torch.compile`` of each whole TransformerLayer (what a user would try
  first; inductor fuses across the pointwise ops and around the matmuls it leaves to BLAS).

    .venv/bin/python bench/fusion.py --out bench/results/fusion_cpu_$(date +%F).json

Measured on the CPU only (no GPU was lent); on a GPU (spawned children there: CUDA does not survive
a fork) the same script measures the real widths:
    python bench/fusion.py --width 1.0 --layers 4 --dtype bfloat16 --seq 4096 --out fusion_gpu.json
Default shape: Minitron-4B-Width's at a quarter of its width (hidden 768, ffn 2304, 8 heads in 2
groups of head_dim 128; 4 layers, vocab 16384), fp32, seq 512, batch 1. The pointwise share of a step shrinks as the width grows (matmul work grows with
hidden x ffn, pointwise work with hidden + ffn), so a fusion that does not pay here pays less at
the real width. Each variant runs in a forked child: step time is the fastest and the median of
``--reps`` passes after ``--warmup`` passes (compilation happens there; its time is recorded).
The loss and the gradient norm are compared with eager's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 16384
VARIANTS = ("eager", "megatron_swiglu", "compile_pointwise", "compile_layers")


def _config(width: float, layers: int):
    """Minitron-4B-Width's shape at ``width`` times its hidden/ffn/heads (head_dim 128, 4 query
    heads a group, as the real model) and ``layers`` layers; vocabulary 16384 (the LM head is not
    what this measures)."""
    from nemo_minitron.config.arch import ModelConfig

    heads = max(4, int(round(32 * width / 4)) * 4)
    return ModelConfig(num_layers=layers, hidden_size=int(3072 * width),
                       ffn_hidden_size=int(9216 * width), num_attention_heads=heads,
                       num_query_groups=heads // 4, head_dim=128, vocab_size=VOCAB,
                       max_position_embeddings=8192, dtype="float32")


def _apply(variant, model):
    import torch

    if variant in ("megatron_swiglu", "compile_pointwise"):
        # the CPU shim turns the flag off at config time (it is refused without TE or CUDA in
        # general); Megatron's MLP reads it at forward time, and its SwiGLU kernel is a
        # torch.compile'd function that runs on the CPU
        model.config.bias_activation_fusion = True
    if variant == "compile_pointwise":
        from megatron.core.transformer import attention

        attention.apply_rotary_pos_emb = torch.compile(attention.apply_rotary_pos_emb)
        for module in model.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.compile()
    if variant == "compile_layers":
        for layer in model.decoder.layers:
            layer.compile()


def _measure(variant, args, queue):
    try:
        import torch

        from nemo_minitron.dist import one_rank_world
        from nemo_minitron.model.build import build_gpt_model

        from nemo_minitron.dist import compute_device

        seq, warmup, reps = args.seq, args.warmup, args.reps
        torch.manual_seed(0)
        with one_rank_world(megatron=True):
            device = compute_device()
            model = build_gpt_model(_config(args.width, args.layers), dtype=args.dtype,
                                    attention_backend="sdpa")
            _apply(variant, model)
            g = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=g).to(device)
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            positions = torch.arange(seq, device=device).unsqueeze(0)
            times, first = [], None
            for i in range(warmup + reps):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss = model(input_ids=inputs, position_ids=positions, attention_mask=None,
                             labels=labels).float().mean()
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                if i < warmup:
                    first = elapsed if first is None else first
                else:
                    times.append(elapsed)
            grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                                       if p.grad is not None)).item()
        queue.put(pickle.dumps(dict(variant=variant, first_step_s=first, min_s=min(times),
                                    median_s=statistics.median(times), loss=loss.item(),
                                    grad_norm=grad_norm, error=None)))
    except BaseException as e:  # noqa: BLE001 - a variant that fails is a result too
        import traceback

        queue.put(pickle.dumps(dict(variant=variant, error=f"{type(e).__name__}: {e}",
                                    traceback=traceback.format_exc()[-2000:])))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--width", type=float, default=0.25,
                    help="fraction of Minitron-4B-Width's hidden/ffn/heads (1.0: the real widths)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    import torch  # noqa: F401 - imported once, before the forks

    import megatron.core  # noqa: F401

    # a CUDA context does not survive fork(); on the CPU, forking skips the imports
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    results = []
    for variant in args.variants.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(variant, args, queue))
        proc.start()
        result = pickle.loads(queue.get(timeout=3600))
        proc.join()
        results.append(result)
        if result["error"]:
            print(f"{variant:18s} failed: {result['error']}", flush=True)
            continue
        print(f"{variant:18s} min {result['min_s']:.3f} s  median {result['median_s']:.3f} s  "
              f"first {result['first_step_s']:.1f} s  loss {result['loss']:.6f}  "
              f"grad_norm {result['grad_norm']:.6f}", flush=True)
    base = next((r for r in results if r["variant"] == "eager" and not r["error"]), None)
    if base:
        for r in results:
            if not r["error"]:
                r["speedup_min"] = base["min_s"] / r["min_s"]
                r["speedup_median"] = base["median_s"] / r["median_s"]
                r["loss_diff"] = abs(r["loss"] - base["loss"])
                r["grad_norm_rel_diff"] = abs(r["grad_norm"] - base["grad_norm"]) / base["grad_norm"]
                print(f"{r['variant']:18s} speed-up (min) {r['speedup_min']:.3f}x  "
                      f"(median) {r['speedup_median']:.3f}x  |loss diff| {r['loss_diff']:.2e}  "
                      f"grad-norm rel diff {r['grad_norm_rel_diff']:.2e}")
    report = dict(torch=torch.__version__, seq=args.seq, warmup=args.warmup, reps=args.reps,
                  width=args.width, layers=args.layers, dtype=args.dtype,
                  shape=dataclasses.asdict(_config(args.width, args.layers)),
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  load_avg=os.getloadavg(), cpus=os.cpu_count(), results=results)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
