"""Presets of the family, as data. Each names its source.

The tiny presets keep every quirk of the real models at a size that runs in milliseconds on a CPU:
GQA with fewer query groups than heads, head_dim != hidden/heads, llama3 RoPE scaling with a small
original context (so tests reach positions far past it), untied embeddings, an ffn that is not a
multiple of hidden, and the real 128256-token vocabulary (so the real Llama-3 tokenizer works).
The tiny teacher -> tiny width student pair has the width ratios of 8B -> 4B-Width
(hidden 4096 -> 3072 = 3/4, ffn 14336 -> 9216 = 9/14), and tiny depth halves the layers as
8B -> 4B-Depth (32 -> 16) does.
"""
from __future__ import annotations

from typing import Dict

from nemo_minitron.config.arch import ModelConfig, RopeScaling
from nemo_minitron.errors import ConfigError

# Small llama3 scaling: wavelengths < 8 kept, > 32 divided by 8, in between smoothed; with
# head_dim 32 and theta 500000 all three bands are populated.
TINY_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=32)

PRESETS: Dict[str, ModelConfig] = {
    # meta-llama/Llama-3.1-8B config.json (no head_dim key: transformers uses 4096/32 = 128).
    "llama31_8b": ModelConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, head_dim=128),
    # nvidia/Llama-3.1-Minitron-4B-Width-Base config.json; tech report arXiv 2408.11796.
    "minitron_4b_width": ModelConfig(
        num_layers=32, hidden_size=3072, ffn_hidden_size=9216, num_attention_heads=32,
        num_query_groups=8, head_dim=128),
    # nvidia/Llama-3.1-Minitron-4B-Depth-Base config.json: 8B with layers 16..31 dropped.
    "minitron_4b_depth": ModelConfig(
        num_layers=16, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, head_dim=128),
    # Tiny teacher (this project): ffn/hidden = 3.5 like 8B; head_dim 32 != 64/4.
    "tiny_llama31": ModelConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=224, num_attention_heads=4,
        num_query_groups=2, head_dim=32, max_position_embeddings=256, rope_scaling=TINY_ROPE),
    # Tiny width student: tiny_llama31 pruned as 8B -> 4B-Width (hidden x3/4, ffn x9/14).
    "tiny_minitron_width": ModelConfig(
        num_layers=4, hidden_size=48, ffn_hidden_size=144, num_attention_heads=4,
        num_query_groups=2, head_dim=32, max_position_embeddings=256, rope_scaling=TINY_ROPE),
    # Tiny depth student: tiny_llama31 with the second half of its layers dropped.
    "tiny_minitron_depth": ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=224, num_attention_heads=4,
        num_query_groups=2, head_dim=32, max_position_embeddings=256, rope_scaling=TINY_ROPE),
}

DESCRIPTIONS: Dict[str, str] = {
    "llama31_8b": "Llama-3.1-8B, the teacher",
    "minitron_4b_width": "Llama-3.1-Minitron-4B-Width-Base (width-pruned 8B)",
    "minitron_4b_depth": "Llama-3.1-Minitron-4B-Depth-Base (depth-pruned 8B)",
    "tiny_llama31": "tiny teacher for tests and the demo",
    "tiny_minitron_width": "tiny width-pruned student of tiny_llama31",
    "tiny_minitron_depth": "tiny depth-pruned student of tiny_llama31",
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
