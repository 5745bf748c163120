"""A small training run inside a run_ranks worker, for the loop tests (no tokenizer needed, so the
NeMo 24.05 tier runs them too)."""
from __future__ import annotations

import torch


def preimport():
    """Import torch + Megatron once in the test process, so forked run_ranks workers start warm
    (~1 s) instead of importing megatron-core again (~10 s each)."""
    from nemo_minitron.compat import cpu

    cpu.activate()
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401

    from nemo_minitron.train import optim

    optim.megatron_optimizer_available()  # imports megatron.core.optimizer where it can
    cpu.activate()  # retarget what was just imported


preimport()

SEQ = 24
# The loop tests use the tiny architecture with a 2048-token vocabulary: the 128256-row embedding
# and output layer dominate a step's time otherwise, and the loop does not need the real tokenizer.
VOCAB, BOS, EOS = 2048, 1, 2


def write_small_vocab_checkpoint(path: str) -> str:
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config import get_preset

    cfg = get_preset("tiny_llama31").replace(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS)
    return write_tiny_hf_checkpoint(path, cfg, seed=0, tokenizer=False)


def write_small_vocab_student(path: str, **kwargs) -> str:
    """A tiny_minitron_width-shaped student (other weights, hidden 48 vs 64) of that vocabulary."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config import get_preset

    cfg = get_preset("tiny_minitron_width").replace(vocab_size=VOCAB, bos_token_id=BOS,
                                                    eos_token_id=EOS)
    return write_tiny_hf_checkpoint(path, cfg, seed=1, tokenizer=False, **kwargs)


def synthetic_samples(n: int = 8, seed: int = 0):
    """Prompt/answer token samples of varied lengths (ids in [3, VOCAB))."""
    from nemo_minitron.data.training import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(3, 9, (1,), generator=g))
        a = int(torch.randint(3, 9, (1,), generator=g))
        out.append(Sample(prompt=[BOS] + torch.randint(3, VOCAB, (p,), generator=g).tolist(),
                          answer=torch.randint(3, VOCAB, (a,), generator=g).tolist() + [EOS]))
    return out


class Stop(Exception):
    """Raised by a callback to simulate a job killed after a step."""


def train(rank, hf_dir, *, steps=6, mbs=1, gbs=4, lr=1e-3, ckpt_dir=None, ckpt_every=0,
          stop_after=None, packed=False, precision="fp32", recompute=None, distributed_opt=False,
          n_samples=8, val=False, lora=None, seq=SEQ, pad_to_max_length=False,
          attention_backend=None, samples=None, forward_step=None):
    """Train the tiny model; return per-step (loss, grad_norm) and the val loss (every rank).
    ``lora``: a LoRASection; then only adapters train (and the result has ``opt_params``, the
    names of the parameters the optimizer holds)."""
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.train.config import OptimSection
    from nemo_minitron.data.training import SFTData
    from nemo_minitron.train.loop import LoopConfig, Trainer
    from nemo_minitron.train.model import build_train_model
    from nemo_minitron.train.optim import build_optimizer, build_scheduler, wrap_ddp

    cfg = read_hf_config(hf_dir)
    data = SFTData(samples or synthetic_samples(n_samples), seq, EOS, packed=packed, seed=7,
                   pad_to_max_length=pad_to_max_length)
    model = build_train_model(cfg, precision=precision, hf_dir=hf_dir, recompute=recompute,
                              use_te=False if lora else None,
                              attention_backend=attention_backend or "auto")
    if lora is not None:
        from nemo_minitron.peft.lora import apply_lora

        apply_lora(model, cfg, lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed_opt)
    oc = OptimSection(lr=lr, min_lr=lr / 10, warmup_steps=2, weight_decay=0.01,
                      use_distributed_optimizer=distributed_opt)
    opt = build_optimizer(ddp, oc, precision)
    loop = LoopConfig(max_steps=steps, micro_batch_size=mbs, global_batch_size=gbs,
                      seq_length=seq, log_every_n_steps=0, ckpt_dir=ckpt_dir,
                      ckpt_every_n_steps=ckpt_every)

    def stop(trainer, step, metrics):
        if stop_after is not None and step >= stop_after:
            raise Stop()

    extra = dict(forward_step=forward_step) if forward_step else {}
    trainer = Trainer(ddp, opt, build_scheduler(oc, steps), data, loop,
                      val_data=data if val else None, callbacks=[stop], **extra)
    try:
        state = trainer.fit()
    except Stop:
        state = trainer.state
    names = {id(p): n for n, p in model.named_parameters()}
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    return dict(opt_params=sorted(names.get(id(p), "?") for g in opt.param_groups
                                  for p in g["params"]),
                changed=changed, losses=[m["loss"] for m in state.history],
                grad_norms=[m["grad_norm"] for m in state.history],
                val_loss=getattr(state, "val_loss", None), start=state.step - len(state.history))
