"""Presets: exact parameter counts, the tiny family's quirks, conf/models/*.yaml in sync."""
import glob
import os
from fractions import Fraction

import pytest
import yaml

from nemo_minitron.config import PRESETS, get_preset
from nemo_minitron.config.nemo import to_nemo_dict
from nemo_minitron.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exact_parameter_counts():
    # shared/FACTS.md section 1 (model cards / tech report)
    assert get_preset("minitron_4b_width").num_params() == 4_512_746_496
    assert get_preset("minitron_4b_width").non_embedding_params() == 3_724_741_632
    assert get_preset("llama31_8b").num_params() == 8_030_261_248


def test_attention_width_is_not_hidden():
    cfg = get_preset("minitron_4b_width")
    assert cfg.q_size == 4096 != cfg.hidden_size


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny")])
def test_tiny_presets_keep_the_quirks(name):
    cfg = get_preset(name)
    assert cfg.num_query_groups < cfg.num_attention_heads  # GQA
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size  # head_dim != hidden/heads
    assert cfg.rope_scaling is not None
    assert cfg.rope_scaling.original_max_position_embeddings < cfg.max_position_embeddings
    assert not cfg.tie_word_embeddings
    assert cfg.vocab_size == 128256  # the real tokenizer's ids are all valid


def test_tiny_teacher_ffn_not_multiple_of_hidden():
    cfg = get_preset("tiny_llama31")
    assert cfg.ffn_hidden_size % cfg.hidden_size


def test_tiny_pair_has_the_8b_to_4b_width_ratios():
    big_t, big_s = get_preset("llama31_8b"), get_preset("minitron_4b_width")
    t, s = get_preset("tiny_llama31"), get_preset("tiny_minitron_width")
    for field in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "head_dim", "num_layers"):
        assert Fraction(getattr(s, field), getattr(t, field)) == \
            Fraction(getattr(big_s, field), getattr(big_t, field)), field
    depth = get_preset("tiny_minitron_depth")
    assert Fraction(depth.num_layers, t.num_layers) == Fraction(
        get_preset("minitron_4b_depth").num_layers, big_t.num_layers)


def test_conf_models_match_presets():
    files = sorted(glob.glob(os.path.join(ROOT, "nemo_minitron", "conf", "models", "*.yaml")))
    assert {os.path.basename(f)[:-5] for f in files} == set(PRESETS)
    for f in files:
        with open(f) as fh:
            data = yaml.safe_load(fh)
        assert data == to_nemo_dict(get_preset(os.path.basename(f)[:-5])), f


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'minitron_8b'.*minitron_4b_width"):
        get_preset("minitron_8b")


def test_from_dict_rejects_unknown_and_missing_keys():
    d = get_preset("tiny_llama31").to_dict()
    assert type(get_preset("tiny_llama31")).from_dict(d) == get_preset("tiny_llama31")
    with pytest.raises(ConfigError, match="unknown model config key.*hiden_size"):
        type(get_preset("tiny_llama31")).from_dict(dict(d, hiden_size=3))
    del d["head_dim"]
    with pytest.raises(ConfigError, match="missing required key.*head_dim"):
        type(get_preset("tiny_llama31")).from_dict(d)


@pytest.mark.parametrize("change, field", [
    ({"num_attention_heads": 5}, "num_attention_heads=5 is not divisible by num_query_groups"),
    ({"head_dim": -1}, "head_dim"), ({"num_layers": 2.5}, "num_layers"),
    ({"dtype": "float64"}, "dtype"), ({"norm_eps": 0}, "norm_eps"),
    ({"rope_theta": 0}, "rope_theta"),
])
def test_invalid_fields(change, field):
    with pytest.raises(ConfigError, match=field):
        get_preset("tiny_llama31").replace(**change)


def test_invalid_rope_scaling():
    from nemo_minitron.config import RopeScaling

    with pytest.raises(ConfigError, match="low_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ConfigError, match="factor"):
        RopeScaling(factor=0.5)
