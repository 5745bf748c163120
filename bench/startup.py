"""Start-up and decode speed of `generate`'s load path against transformers, in one run.

    .venv/bin/python bench/startup.py [--workdir /tmp/bench_startup] [--layers 4] [--tokens 32]
        [--repeat 2] [--before /tmp/startup_before] [--out bench/results/startup_DATE.txt]

The model: a synthetic Llama-3.1-Minitron-4B-Width with ``--layers`` layers (real widths, GQA,
head_dim 128, the real 128256 vocab, untied embeddings; fp32 safetensors, ~5 GB at 4 layers),
written once by nemo_minitron.checkpoint.tiny into ``--workdir``. Each measurement is a fresh
process (page cache warmed first by reading the shards once), fp32 on the CPU, batch 1, the same
prompt ids, ``--tokens`` greedy tokens (end of text ignored by both):

  * ``transformers``: ``import transformers`` + ``AutoModelForCausalLM.from_pretrained`` (load),
    then ``model.generate`` (decode);
  * ``ours``: what ``nemo-minitron generate`` does (nemo_minitron.inference.job.setup):
    ``init_megatron`` (Megatron's import, the process group), build the GPTModel, load the HF
    weights into it (load), then ``nemo_minitron.inference.generate.generate`` (decode).
    ``--before DIR``: the same for another tree (e.g. ``git archive HEAD | tar -x -C DIR``), run
    with ``PYTHONPATH=DIR``: the before/after comparison in the same run.

``load`` starts after ``import torch`` (both need it; its time is printed apart) and ends when the
model is ready; ``decode`` is the whole generate call (prefill of the prompt + every token).
The generated ids of every variant are asserted equal to transformers'. The machine is shared:
compare within one run; the median of ``--repeat`` runs is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [128000, 791, 6864, 315, 9822, 374, 12366, 13, 578, 7160, 315]  # BOS + 10 ids


def child(kind: str, ckpt: str, tokens: int) -> dict:
    """One measurement in this (fresh) process; returns the phases in seconds and the ids."""
    t = time.perf_counter()
    import torch

    out = {"import_torch_s": time.perf_counter() - t}
    phases = {}
    t0 = time.perf_counter()
    if kind == "transformers":
        import transformers

        phases["import transformers"] = time.perf_counter() - t0
        t = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        phases["from_pretrained"] = time.perf_counter() - t
        out["load_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(torch.tensor([PROMPT]), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False)
        out["decode_s"] = time.perf_counter() - t
        out["ids"] = ids[0, len(PROMPT):].tolist()
    else:
        import inspect

        from nemo_minitron.config.hf import read_hf_config
        from nemo_minitron.dist import init_megatron
        from nemo_minitron.inference.runner import ModelRunner
        from nemo_minitron.model.build import build_gpt_model
        from nemo_minitron.model.load import load_hf_into_model

        phases["import nemo_minitron"] = time.perf_counter() - t0
        # nemo_minitron.inference.job.setup, phase by phase (the before tree: ModelRunner.from_hf)
        t = time.perf_counter()
        init_megatron(tp=1, pp=1, seed=1234)
        phases["init_megatron (megatron import, process group)"] = time.perf_counter() - t
        t = time.perf_counter()
        cfg = read_hf_config(ckpt)
        kw = {"init_weights": False} if "init_weights" in \
            inspect.signature(build_gpt_model).parameters else {}
        model = build_gpt_model(cfg, dtype="float32", **kw)
        phases["build GPTModel" + (" (no random init)" if kw else "")] = time.perf_counter() - t
        load_kw = {"assign": True} if "assign" in \
            inspect.signature(load_hf_into_model).parameters else {}  # what from_hf passes
        t = time.perf_counter()
        load_hf_into_model(model, cfg, ckpt, **load_kw)
        runner = ModelRunner(model, cfg)
        phases["load weights"] = time.perf_counter() - t
        out["load_s"] = time.perf_counter() - t0
        from nemo_minitron.inference.generate import generate
        from nemo_minitron.inference.sampling import SamplingParams

        t = time.perf_counter()
        [done] = generate(runner, [PROMPT], SamplingParams(greedy=True, max_new_tokens=tokens,
                                                            ignore_eos=True))
        out["decode_s"] = time.perf_counter() - t
        out["ids"] = list(done.tokens)
    out["phases"] = phases
    return out


def run_child(kind: str, ckpt: str, tokens: int, tree: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--ckpt", ckpt,
                        "--tokens", str(tokens)], env=env, cwd=tree, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{kind} ({tree}) failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_s"] = wall
    return res


def ensure_checkpoint(workdir: str, layers: int) -> str:
    ckpt = os.path.join(workdir, f"minitron_4b_width_{layers}layers_fp32")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        sys.path.insert(0, ROOT)
        from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
        from nemo_minitron.config.presets import get_preset

        cfg = get_preset("minitron_4b_width").replace(num_layers=layers)
        write_tiny_hf_checkpoint(ckpt, cfg, dtype="float32", num_shards=1)
    for name in os.listdir(ckpt):  # warm the page cache: every variant reads from memory
        if name.endswith(".safetensors"):
            with open(os.path.join(ckpt, name), "rb") as f:
                while f.read(1 << 26):
                    pass
    return ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/bench_startup")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--before", help="another tree (the HEAD before the change) to measure too")
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ckpt, args.tokens)))
        return
    os.makedirs(args.workdir, exist_ok=True)
    ckpt = ensure_checkpoint(args.workdir, args.layers)
    variants = [("transformers", "transformers", ROOT)]
    if args.before:
        variants.append(("ours before", "ours", os.path.abspath(args.before)))
    variants.append(("ours after", "ours", ROOT))
    runs = {name: [] for name, _, _ in variants}
    for _ in range(args.repeat):
        for name, kind, tree in variants:
            runs[name].append(run_child(kind, ckpt, args.tokens, tree))
    ref = runs["transformers"][0]["ids"]
    for name, rs in runs.items():
        for r in rs:
            assert r["ids"] == ref, f"{name}: ids differ from transformers': {r['ids']} vs {ref}"
    import torch

    lines = [f"# bench/startup.py {time.strftime('%Y-%m-%d %H:%M:%S')} on {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, threads {torch.get_num_threads()}",
             f"# model: Minitron-4B-Width shape, {args.layers} layers, vocab 128256, fp32, CPU, "
             f"batch 1, prompt {len(PROMPT)} ids, {args.tokens} greedy tokens; ids equal: yes",
             f"# median of {args.repeat} fresh processes per variant (interleaved)",
             "",
             f"{'variant':<14} {'import torch s':>14} {'load s':>8} {'decode s':>9} "
             f"{'tok/s':>7} {'process s':>10}"]
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    for name, rs in runs.items():
        lines.append(f"{name:<14} {med(rs, 'import_torch_s'):>14.2f} {med(rs, 'load_s'):>8.2f} "
                     f"{med(rs, 'decode_s'):>9.2f} {args.tokens / med(rs, 'decode_s'):>7.2f} "
                     f"{med(rs, 'process_s'):>10.2f}")
    lines += ["", "load phases (median s):"]
    for name, rs in runs.items():
        for phase in rs[0]["phases"]:
            lines.append(f"  {name:<14} {phase:<50} "
                         f"{statistics.median(r['phases'][phase] for r in rs):>6.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
