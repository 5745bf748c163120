"""HF config.json <-> ModelConfig."""
import json

import pytest

from nemo_minitron.config import PRESETS, get_preset
from nemo_minitron.config.hf import (check_hf_shapes, expected_hf_shapes, from_hf_dict,
                                     read_hf_config, to_hf_dict)
from nemo_minitron.errors import CheckpointError, ConfigError
from tests.data.real_configs import REAL


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_reads_as_preset(name):
    assert from_hf_dict(REAL[name]) == get_preset(name)


@pytest.mark.parametrize("name", sorted(REAL))
def test_written_config_matches_released_file(name):
    ours = to_hf_dict(get_preset(name))
    real = dict(REAL[name])
    real.pop("transformers_version")
    # Every key of the released file, with the same value; we add head_dim where 8B omits it.
    assert {k: ours[k] for k in real} == real
    assert set(ours) - set(real) <= {"head_dim"}
    assert ours["head_dim"] == 128


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip(name):
    cfg = get_preset(name)
    assert from_hf_dict(to_hf_dict(cfg)) == cfg
    assert from_hf_dict(json.loads(json.dumps(to_hf_dict(cfg)))) == cfg


def test_transformers_reads_what_we_write():
    transformers = pytest.importorskip("transformers")
    cfg = get_preset("minitron_4b_width")
    hf = transformers.LlamaConfig(**to_hf_dict(cfg))
    assert hf.head_dim == 128 and hf.hidden_size == 3072
    rope = getattr(hf, "rope_parameters", None) or dict(hf.rope_scaling, rope_theta=hf.rope_theta)
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 8192 and rope["rope_theta"] == 500000.0


def test_reads_config_written_by_installed_transformers(tmp_path):
    """transformers 5 writes rope_parameters (with rope_theta inside) and may omit torch_dtype."""
    transformers = pytest.importorskip("transformers")
    cfg = get_preset("tiny_llama31")
    hf = to_hf_dict(cfg)
    transformers.LlamaConfig(**hf).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    back = read_hf_config(str(tmp_path))
    assert back.replace(dtype=cfg.dtype) == cfg
    if "rope_parameters" in written:  # the 5.x style really was exercised
        assert "rope_scaling" not in written


def test_transformers5_style_by_hand():
    hf = dict(REAL["minitron_4b_width"])
    rope = dict(hf.pop("rope_scaling"), rope_theta=hf.pop("rope_theta"))
    hf["rope_parameters"] = rope
    hf["dtype"] = hf.pop("torch_dtype")
    assert from_hf_dict(hf) == get_preset("minitron_4b_width")


def test_legacy_rope_type_key_and_no_scaling():
    hf = dict(REAL["minitron_4b_width"])
    hf["rope_scaling"] = {k if k != "rope_type" else "type": v for k, v in hf["rope_scaling"].items()}
    assert from_hf_dict(hf).rope_scaling == get_preset("minitron_4b_width").rope_scaling
    hf["rope_scaling"] = None
    assert from_hf_dict(hf).rope_scaling is None


@pytest.mark.parametrize("change, field", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": dict(REAL["minitron_4b_width"]["rope_scaling"], beta=1)}, "beta"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"num_key_value_heads": 5}, "num_query_groups"),
    ({"head_dim": 0}, "head_dim"),
    ({"torch_dtype": "int8"}, "dtype"),
    ({"rope_parameters": {"rope_theta": 1.0}}, "rope_parameters"),
])
def test_unsupported_configs_name_the_field(change, field):
    hf = dict(REAL["minitron_4b_width"], **change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_hf_dict(hf)


@pytest.mark.parametrize("key", ["num_hidden_layers", "rms_norm_eps", "rope_theta", "vocab_size"])
def test_missing_required_key(key):
    hf = dict(REAL["minitron_4b_width"])
    del hf[key]
    with pytest.raises(ConfigError, match=key):
        from_hf_dict(hf)


def test_head_dim_inconsistent_with_weights():
    """A 4B-Width config.json without head_dim means 3072/32 = 96 to transformers; the weights
    say 128. The shape check names head_dim and the value to set."""
    hf = dict(REAL["minitron_4b_width"])
    del hf["head_dim"]
    cfg = from_hf_dict(hf)
    assert cfg.head_dim == 96
    real_shapes = expected_hf_shapes(get_preset("minitron_4b_width"))
    with pytest.raises(ConfigError, match=r"head_dim=96 is inconsistent.*head_dim: 128"):
        check_hf_shapes(cfg, real_shapes)


def test_shape_check_reports_missing_unexpected_and_wrong():
    cfg = get_preset("tiny_llama31")
    shapes = dict(expected_hf_shapes(cfg))
    del shapes["model.layers.1.mlp.up_proj.weight"]
    shapes["model.layers.0.self_attn.q_proj.bias"] = (128,)
    shapes["model.layers.2.mlp.down_proj.weight"] = (64, 225)
    with pytest.raises(ConfigError) as err:
        check_hf_shapes(cfg, shapes)
    msg = str(err.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected: model.layers.0.self_attn.q_proj.bias" in msg
    assert "model.layers.2.mlp.down_proj.weight [64, 225] (expected [64, 224])" in msg
    check_hf_shapes(cfg, expected_hf_shapes(cfg))  # the consistent case passes


def test_expected_shapes_match_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = get_preset("tiny_minitron_width")
    hf = to_hf_dict(cfg)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got.items()) == list(expected_hf_shapes(cfg).items())  # names, shapes, order
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_read_hf_config_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: no such file"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_hf_config(str(tmp_path))
