"""Parallel layout validation and vocabulary padding."""
import pytest

from nemo_minitron.config import get_preset, valid_tp_sizes, validate_parallel
from nemo_minitron.errors import ConfigError


def test_padded_vocab_follows_megatron_rule():
    # shared/FACTS.md section 3: NeMo's default divisor 128 pads 128256 to 128512 at TP4 and
    # 129024 at TP8; it stays 128256 at TP<=2.
    nemo_default = get_preset("minitron_4b_width").replace(make_vocab_size_divisible_by=128)
    assert [nemo_default.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == \
        [128256, 128256, 128512, 129024]
    # our default keeps it unpadded up to TP8 (no slicing needed on export)
    assert {get_preset("minitron_4b_width").padded_vocab_size(tp) for tp in (1, 2, 4, 8)} == \
        {128256}
    assert get_preset("minitron_4b_width").padded_vocab_size(16) == 128512


def test_valid_layouts():
    cfg = get_preset("minitron_4b_width")
    assert valid_tp_sizes(cfg) == [1, 2, 4, 8]
    layout = validate_parallel(cfg, tp=8, pp=4, world_size=64)
    assert (layout.tp, layout.pp, layout.dp) == (8, 4, 2)


@pytest.mark.parametrize("tp, pp, message", [
    (16, 1, "num_query_groups=8 is not divisible by tensor_model_parallel_size=16"),
    (3, 1, "num_attention_heads=32 is not divisible by tensor_model_parallel_size=3"),
    (1, 3, "num_layers=32 is not divisible by pipeline_model_parallel_size=3"),
    (0, 1, "tensor_model_parallel_size=0 must be a positive integer"),
])
def test_invalid_layouts(tp, pp, message):
    with pytest.raises(ConfigError, match=message):
        validate_parallel(get_preset("minitron_4b_width"), tp, pp)


def test_ffn_must_divide():
    cfg = get_preset("tiny_llama31").replace(ffn_hidden_size=222)
    with pytest.raises(ConfigError, match="ffn_hidden_size=222 is not divisible by "
                                          "tensor_model_parallel_size=4"):
        validate_parallel(cfg.replace(num_attention_heads=4, num_query_groups=4), 4, 1)


def test_world_size_must_be_a_multiple():
    with pytest.raises(ConfigError, match="world size 6 is not a multiple of TP\\*PP = 4\\*1"):
        validate_parallel(get_preset("minitron_4b_width"), 4, 1, world_size=6)
