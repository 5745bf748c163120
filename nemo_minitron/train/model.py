"""This rank's trainable model: built at the current TP/PP, filled from an HF checkpoint (or left
at Megatron's seeded random init for tests), wrapped in Megatron DDP."""
from __future__ import annotations

from typing import Optional

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import ConfigError

PRECISIONS = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", "fp32": "float32", "32": "float32"}


def params_dtype(precision: str) -> str:
    try:
        return PRECISIONS[str(precision)]
    except KeyError:
        raise ConfigError(f"trainer.precision={precision!r} is not one of bf16, fp32") from None


def recompute_overrides(granularity: Optional[str], num_layers: int = 1) -> dict:
    """TransformerConfig fields for activation recomputation ("full": each chunk of ``num_layers``
    layers keeps only its input and reruns its forward during backward)."""
    if granularity in (None, "", "none", "null"):
        return {}
    if granularity != "full":
        raise ConfigError(f"model.activations_checkpoint_granularity={granularity!r}: only 'full' "
                          "is supported (selective recompute needs Transformer Engine attention)")
    return dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=num_layers)


def build_train_model(cfg: ModelConfig, *, precision: str = "bf16", hf_dir: Optional[str] = None,
                      seed: int = 1234, recompute: Optional[str] = None,
                      recompute_num_layers: int = 1, use_te: Optional[bool] = None,
                      attention_backend: str = "auto", random_init: bool = True):
    """GPTModel for this rank (TP/PP from Megatron's parallel state), weights from ``hf_dir``:
    an HF directory, a .nemo, or an open ``model.source.ModelSource`` (read natively: this rank's
    part only). ``use_te``: Transformer Engine spec (default: where usable; LoRA needs the local
    spec). ``attention_backend``: ``model.attention_backend`` (nemo_minitron/model/attention.py).
    ``random_init=False`` (with ``hf_dir``): Megatron's random init of the weights the strict load
    overwrites next is skipped (the frozen teacher). The default keeps it, so the generator state
    every later draw (LoRA, a hidden-loss projection) starts from stays as it was."""
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.source import opened

    if not random_init and not hf_dir:
        raise ValueError("random_init=False needs weights to load (hf_dir)")
    torch.manual_seed(seed)  # CPU init draws the full weight from this generator, then splits it
    model = build_gpt_model(cfg, dtype=params_dtype(precision), parallel_output=True, use_te=use_te,
                            config_overrides=recompute_overrides(recompute, recompute_num_layers),
                            attention_backend=attention_backend, init_weights=random_init)
    if hf_dir:
        with opened(hf_dir) as source:
            source.load_into(model, cfg)
    return model
