"""SFT padding on the CPU: positions computed per real token and step time, fixed padding to
``seq_length`` (``data.pad_to_max_length=true``, the old behaviour) against dynamic padding to
each micro batch's longest row (the default), in the same run, on the same data and model.

    .venv/bin/python bench/sft_padding.py --out bench/results/sft_padding_cpu_$(date +%F).json

Data: a long-tailed SFT set made from ``pydoc_data.topics`` paragraphs (Python's own help texts):
a short prompt naming the topic, the paragraph as the answer (a few to several hundred tokens).
Model: tiny_llama31 with the real Llama-3 tokenizer (vocabulary 128256, so the LM head is most of
a step, as in real SFT), fp32, TP=PP=1, the one Trainer. Four runs: old (fixed padding, the LM
head on every position), dynamic padding alone, new (dynamic padding + logits on counted tokens
only, the default), new + the SDPA core attention (``model.attention_backend=sdpa``). Losses must
agree between the runs (they count the same tokens); the JSON records the largest difference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pydoc_sft_records(n: int, seed: int = 0, max_chars: int = 2400):
    """``n`` {"input", "output"} records: short prompts, paragraph answers of long-tailed length."""
    from pydoc_data.topics import topics

    paras = []
    for topic, text in sorted(topics.items()):
        for i, p in enumerate(x.strip() for x in text.split("\n\n")):
            if 40 <= len(p) <= max_chars:
                paras.append((topic, i, p))
    random.Random(seed).shuffle(paras)
    return [{"input": f"Explain part {i} of the Python topic '{t}'.", "output": p}
            for t, i, p in paras[:n]]


def full_logits_forward_step(model, batch):
    """The loop's forward step before logits were limited to counted tokens: the LM head and the
    cross entropy over every position of the batch."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 attention_mask=batch["attention_mask"], labels=batch["labels"])


def run(mode, samples, seq, hf_dir, cfg, steps, mbs, gbs):
    import torch

    from nemo_minitron.train.config import OptimSection
    from nemo_minitron.data.training import SFTData
    from nemo_minitron.train.loop import LoopConfig, Trainer, default_forward_step
    from nemo_minitron.train.model import build_train_model
    from nemo_minitron.train.optim import build_optimizer, build_scheduler, wrap_ddp

    fixed, backend, counted = mode
    data = SFTData(samples, seq, cfg.eos_token_id if isinstance(cfg.eos_token_id, int)
                   else cfg.eos_token_id[0], seed=7, pad_to_max_length=fixed)
    model = build_train_model(cfg, precision="fp32", hf_dir=hf_dir, attention_backend=backend)
    ddp = wrap_ddp(model)
    oc = OptimSection(lr=1e-4, min_lr=1e-5, warmup_steps=1, weight_decay=0.0)
    loop = LoopConfig(max_steps=steps, micro_batch_size=mbs, global_batch_size=gbs, seq_length=seq,
                      log_every_n_steps=0)
    trainer = Trainer(ddp, build_optimizer(ddp, oc, "fp32"), build_scheduler(oc, steps), data, loop,
                      forward_step=default_forward_step if counted else full_logits_forward_step)
    t0 = time.perf_counter()
    state = trainer.fit()
    wall = time.perf_counter() - t0
    real = computed = counted_tokens = 0
    for step in range(steps):
        for b in data.micro_batches(step, gbs, mbs):
            real += int((b["segment_ids"] >= 0).sum())
            computed += b["input_ids"].numel()
            counted_tokens += int(b["loss_mask"].sum())
    times = [m["step_time_s"] for m in state.history[1:]]  # the first step warms up
    del trainer, ddp, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dict(pad_to_max_length=fixed, attention_backend=backend, logits_on="counted tokens"
                if counted else "every position", real_tokens=real,
                positions_computed=computed, positions_per_real_token=computed / real,
                lm_head_positions=counted_tokens if counted else computed,
                loss_tokens=counted_tokens,
                step_time_s_median=statistics.median(times), step_time_s_min=min(times),
                step_times_s=times, fit_wall_s=wall,
                losses=[m["loss"] for m in state.history])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON result (default: print only)")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--gbs", type=int, default=4)
    a = p.parse_args(argv)

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    from nemo_minitron.dist import free_port, init_megatron

    os.environ["MASTER_PORT"] = str(free_port())
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.data.training import SFTTokenizer, load_sft_samples

    work = tempfile.mkdtemp(prefix="sft_padding_")
    hf_dir = write_tiny_hf_checkpoint(os.path.join(work, "tiny"), "tiny_llama31", seed=0)
    cfg = read_hf_config(hf_dir)
    path = os.path.join(work, "train.jsonl")
    with open(path, "w") as f:
        for r in pydoc_sft_records(a.samples):
            f.write(json.dumps(r) + "\n")
    template = "{input}\n\n{output}"
    samples = load_sft_samples(path, SFTTokenizer(hf_dir), template, a.seq_length)
    lengths = sorted(s.num_positions for s in samples)
    init_megatron(tp=1, pp=1, rendezvous=False)

    # old: fixed padding, logits everywhere; then dynamic padding alone; then + logits on counted
    # tokens only (the new default); then + the SDPA core attention
    modes = [(True, "megatron", False), (False, "megatron", False), (False, "megatron", True),
             (False, "sdpa", True)]
    runs = [run(m, samples, a.seq_length, hf_dir, cfg, a.steps, a.mbs, a.gbs) for m in modes]
    old, dyn, new, sdpa = runs
    result = dict(
        bench="sft_padding", date=time.strftime("%Y-%m-%d"), torch=__import__("torch").__version__,
        threads=__import__("torch").get_num_threads(), model="tiny_llama31 (vocab 128256)",
        seq_length=a.seq_length, micro_batch_size=a.mbs, global_batch_size=a.gbs, steps=a.steps,
        data=dict(source="pydoc_data.topics paragraphs", samples=len(samples),
                  positions_min=lengths[0], positions_median=lengths[len(lengths) // 2],
                  positions_p90=lengths[int(0.9 * len(lengths))], positions_max=lengths[-1]),
        runs=dict(old_fixed=old, dynamic=dyn, new_dynamic_counted_logits=new,
                  new_plus_sdpa=sdpa),
        ratios=dict(
            positions_per_real_token_old=old["positions_per_real_token"],
            positions_per_real_token_new=new["positions_per_real_token"],
            positions_old_over_new=old["positions_computed"] / new["positions_computed"],
            # min over the timed steps: the least disturbed by other work on a shared CPU
            step_time_old_over_dynamic=old["step_time_s_min"] / dyn["step_time_s_min"],
            step_time_old_over_new=old["step_time_s_min"] / new["step_time_s_min"],
            step_time_new_over_new_sdpa=new["step_time_s_min"] / sdpa["step_time_s_min"],
            median_step_time_old_over_new=old["step_time_s_median"] / new["step_time_s_median"]),
        max_loss_diff_vs_old={k: max(abs(x - y) for x, y in zip(old["losses"], r["losses"]))
                              for k, r in (("dynamic", dyn), ("new", new), ("sdpa", sdpa))})
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
