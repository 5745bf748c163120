"""A small training run inside a run_ranks worker, for the loop tests (no tokenizer needed, so the
NeMo 24.05 tier runs them too)."""
from __future__ import annotations

import torch

SEQ = 24


def synthetic_samples(n: int = 8, seed: int = 0):
    """Prompt/answer token samples of varied lengths (ids < 2000; BOS/EOS as the real ones)."""
    from nemo_minitron.train.data import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(3, 9, (1,), generator=g))
        a = int(torch.randint(3, 9, (1,), generator=g))
        out.append(Sample(prompt=[128000] + torch.randint(0, 2000, (p,), generator=g).tolist(),
                          answer=torch.randint(0, 2000, (a,), generator=g).tolist() + [128001]))
    return out


class Stop(Exception):
    """Raised by a callback to simulate a job killed after a step."""


def train(rank, hf_dir, *, steps=6, mbs=1, gbs=4, lr=1e-3, ckpt_dir=None, ckpt_every=0,
          stop_after=None, packed=False, precision="fp32", recompute=None, distributed_opt=False,
          n_samples=8, val=False):
    """Train the tiny model; return per-step (loss, grad_norm) and the val loss (every rank)."""
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.train.config import OptimSection
    from nemo_minitron.train.data import SFTData
    from nemo_minitron.train.loop import LoopConfig, Trainer
    from nemo_minitron.train.model import build_train_model
    from nemo_minitron.train.optim import build_optimizer, build_scheduler, wrap_ddp

    cfg = read_hf_config(hf_dir)
    data = SFTData(synthetic_samples(n_samples), SEQ, 128001, packed=packed, seed=7)
    model = build_train_model(cfg, precision=precision, hf_dir=hf_dir, recompute=recompute)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed_opt)
    oc = OptimSection(lr=lr, min_lr=lr / 10, warmup_steps=2, weight_decay=0.01,
                      use_distributed_optimizer=distributed_opt)
    opt = build_optimizer(ddp, oc, precision)
    loop = LoopConfig(max_steps=steps, micro_batch_size=mbs, global_batch_size=gbs,
                      seq_length=SEQ, log_every_n_steps=0, ckpt_dir=ckpt_dir,
                      ckpt_every_n_steps=ckpt_every)

    def stop(trainer, step, metrics):
        if stop_after is not None and step >= stop_after:
            raise Stop()

    trainer = Trainer(ddp, opt, build_scheduler(oc, steps), data, loop,
                      val_data=data if val else None, callbacks=[stop])
    try:
        state = trainer.fit()
    except Stop:
        state = trainer.state
    return dict(losses=[m["loss"] for m in state.history],
                grad_norms=[m["grad_norm"] for m in state.history],
                val_loss=getattr(state, "val_loss", None), start=state.step - len(state.history))
