"""Llama-3.1 RoPE, applied exactly once on every supported megatron-core.

megatron-core < 0.10 (NeMo 24.05 has 0.7) cannot scale RoPE the llama3 way; 0.10+ can, but with
Llama-3.1's constants hard-coded (original context 8192). So the model builder always asks Megatron
for plain RoPE (``rope_scaling=False``) and then installs the frequencies computed here. Positions
are never interpolated (no ``seq_len_interpolation_factor``), so scaling happens once.
"""
from __future__ import annotations

import math

import torch

from nemo_minitron.config.arch import ModelConfig, RopeScaling


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim/2, in fp32 as Megatron and transformers compute it."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def llama3_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The rotary inverse frequencies of ``cfg`` [head_dim/2], llama3-scaled when configured."""
    inv_freq = base_inv_freq(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling is None:
        return inv_freq
    return scale_llama3(inv_freq, cfg.rope_scaling)


def scale_llama3(inv_freq: torch.Tensor, rs: RopeScaling) -> torch.Tensor:
    """Llama-3.1 scaling of plain inverse frequencies ``inv_freq`` [head_dim/2] (same dtype).

    wavelen = 2*pi/inv_freq; wavelen < original/high_freq_factor: kept; > original/low_freq_factor:
    divided by factor; in between: (1-s)*inv_freq/factor + s*inv_freq with
    s = (original/wavelen - low_freq_factor)/(high_freq_factor - low_freq_factor).
    """
    original = rs.original_max_position_embeddings
    low_wavelen = original / rs.low_freq_factor
    high_wavelen = original / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (original / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(model, cfg: ModelConfig) -> None:
    """Install ``cfg``'s RoPE frequencies in a freshly built Megatron GPTModel (before any forward:
    newer megatron-core caches the rotary embedding per sequence length)."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        raise ValueError("model has no rotary_pos_emb (position_embedding_type must be 'rope')")
    if getattr(rotary, "seq_len_interpolation_factor", None) is not None:
        raise ValueError("seq_len_interpolation_factor is set: RoPE would be scaled twice")
    current = rotary.inv_freq
    rotary.inv_freq = llama3_inv_freq(cfg).to(device=current.device, dtype=current.dtype)
