"""Llama-3.1 RoPE frequencies against transformers' llama3 rope (the reference implementation)."""
import math

import pytest
import torch

from nemo_minitron.config import get_preset
from nemo_minitron.config.hf import to_hf_dict
from nemo_minitron.model.rope import base_inv_freq, llama3_inv_freq


def _transformers_inv_freq(cfg):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(**to_hf_dict(cfg))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    assert scaling == 1.0
    return inv_freq


@pytest.mark.parametrize("name", ["tiny_llama31", "minitron_4b_width"])
def test_inv_freq_equals_transformers_llama3(name):
    cfg = get_preset(name)
    ours, ref = llama3_inv_freq(cfg), _transformers_inv_freq(cfg)
    assert ours.dtype == torch.float32 and ours.shape == (cfg.head_dim // 2,)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_tiny_preset_exercises_all_three_bands():
    cfg = get_preset("tiny_llama31")
    base, scaled = base_inv_freq(cfg.head_dim, cfg.rope_theta), llama3_inv_freq(cfg)
    wavelen = 2 * math.pi / base
    rs = cfg.rope_scaling
    high = wavelen < rs.original_max_position_embeddings / rs.high_freq_factor
    low = wavelen > rs.original_max_position_embeddings / rs.low_freq_factor
    medium = ~high & ~low
    assert high.any() and low.any() and medium.any()
    assert torch.equal(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / rs.factor, rtol=0, atol=0)
    assert ((scaled[medium] < base[medium]) & (scaled[medium] > base[medium] / rs.factor)).all()


def test_no_scaling_is_plain_rope():
    cfg = get_preset("tiny_llama31").replace(rope_scaling=None)
    assert torch.equal(llama3_inv_freq(cfg), base_inv_freq(cfg.head_dim, cfg.rope_theta))
