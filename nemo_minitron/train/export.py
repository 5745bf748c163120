"""The final output of a training run (finetune, distill): the trained model written by every rank
through :mod:`nemo_minitron.model.save` -- a ``.nemo`` saved natively with Megatron's
``dist_checkpointing`` (or an extracted .nemo directory), or an HF directory streamed to rank 0
one tensor at a time. No converter process, no whole model on one rank.
"""
from __future__ import annotations

from typing import Optional

from nemo_minitron.checkpoint.paths import check_output_path
from nemo_minitron.config.arch import ModelConfig


def save_final_output(model, cfg: ModelConfig, out: str, base_dir: Optional[str] = None,
                      overwrite: bool = False, nemo_dir: bool = False,
                      adjust=None) -> Optional[str]:
    """Collective. Write the trained model to ``out`` (``model.save.save_model``: a .nemo, an
    extracted .nemo directory with ``nemo_dir``, else an HF directory) in ``cfg.dtype``, with the
    tokenizer of ``base_dir`` (the base model: HF dir or .nemo); returns the path on rank 0."""
    from nemo_minitron.model.save import save_model

    check_output_path(out)
    return save_model(model, cfg, out, base=base_dir, overwrite=overwrite, nemo_dir=nemo_dir,
                      adjust=adjust)
