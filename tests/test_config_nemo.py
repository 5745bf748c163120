"""NeMo model_config.yaml <-> ModelConfig."""
import os

import pytest
import yaml

from nemo_minitron.config import PRESETS, get_preset
from nemo_minitron.config.nemo import (NEMO_RESTORE_DEFAULTS, DoubleRopeScalingError, dump_yaml,
                                       from_nemo_dict, read_nemo_config, to_nemo_dict)
from nemo_minitron.errors import CheckpointError, ConfigError

DATA = os.path.join(os.path.dirname(__file__), "data")
NEMO2405 = os.path.join(DATA, "nemo2405_llama3_8b_model_config.yaml")

# The keys NeMo 24.05's MegatronGPTModel reads for this family (shared/FACTS.md section 3).
NEMO2405_KEYS = {
    "mcore_gpt", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "kv_channels", "encoder_seq_length", "max_position_embeddings",
    "init_method_std", "layernorm_epsilon", "normalization", "activation", "bias",
    "share_embeddings_and_output_weights", "position_embedding_type", "rotary_base",
    "rotary_percentage", "make_vocab_size_divisible_by", "precision", "tokenizer",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
    "global_batch_size", "megatron_amp_O2", "transformer_engine", "dist_ckpt_format"}
LATER_NEMO_ROPE_KEYS = {"scale_positional_embedding", "scale_factor", "low_freq_factor",
                        "high_freq_factor", "old_context_len"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_yaml_text(name):
    cfg = get_preset(name)
    text = dump_yaml(to_nemo_dict(cfg, tp=2, pp=2))
    assert from_nemo_dict(yaml.safe_load(text)) == cfg


def test_written_keys():
    d = to_nemo_dict(get_preset("minitron_4b_width"), tp=4)
    assert NEMO2405_KEYS <= set(d)
    assert set(d) - NEMO2405_KEYS == LATER_NEMO_ROPE_KEYS | set(NEMO_RESTORE_DEFAULTS) | {
        "vocab_size", "transformer_block_type"}
    assert d["hidden_dropout"] == d["attention_dropout"] == d["ffn_dropout"] == 0.0
    assert d["megatron_amp_O2"] is False and "optim" in d
    assert d["kv_channels"] == 128 and d["hidden_size"] == 3072
    assert d["scale_positional_embedding"] is True
    assert "seq_len_interpolation_factor" not in d  # would scale RoPE twice in later NeMo
    assert d["tensor_model_parallel_size"] == 4 and d["precision"] == "bf16"
    assert d["activation"] == "fast-swiglu" and d["normalization"] == "rmsnorm"
    assert d["share_embeddings_and_output_weights"] is False
    assert d["encoder_seq_length"] == 8192 and d["max_position_embeddings"] == 131072
    # padded vocab stays 128256 up to TP8 with the written divisor
    assert all(128256 % (d["make_vocab_size_divisible_by"] * tp) == 0 for tp in (1, 2, 4, 8))


def test_reads_nemo2405_written_config():
    with pytest.raises(ConfigError, match="vocab_size"):
        read_nemo_config(NEMO2405)  # NeMo keeps the vocabulary in the tokenizer, not the yaml
    cfg = read_nemo_config(NEMO2405, vocab_size=128256)
    assert cfg.head_dim == 128 and cfg.num_query_groups == 8
    assert cfg.rope_scaling is None  # NeMo 24.05 had no llama3 RoPE: reported as such
    assert cfg.max_position_embeddings == 8192 and cfg.make_vocab_size_divisible_by == 128
    assert cfg.dtype == "bfloat16"
    assert cfg.replace(rope_scaling=get_preset("llama31_8b").rope_scaling,
                       max_position_embeddings=131072, make_vocab_size_divisible_by=32) \
        == get_preset("llama31_8b")


def test_reads_full_training_config(tmp_path):
    with open(NEMO2405) as f:
        model = yaml.safe_load(f)
    path = tmp_path / "megatron_llama_config.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"devices": 8}, "model": model}))
    assert read_nemo_config(str(path), vocab_size=128256).num_layers == 32


def test_double_scaled_rope_is_detected():
    d = to_nemo_dict(get_preset("minitron_4b_width"))
    d["seq_len_interpolation_factor"] = 8  # what NeMo 24.09-2.1 converters added
    with pytest.raises(DoubleRopeScalingError, match="twice"):
        from_nemo_dict(d)
    repaired = from_nemo_dict(d, repair_double_rope=True)
    assert repaired == get_preset("minitron_4b_width")


def test_later_nemo_config_without_constants_gets_llama31_defaults():
    d = to_nemo_dict(get_preset("minitron_4b_width"))
    for key in ("scale_factor", "low_freq_factor", "high_freq_factor", "old_context_len"):
        del d[key]
    assert from_nemo_dict(d).rope_scaling == get_preset("minitron_4b_width").rope_scaling


def test_linear_interpolation_alone_is_unsupported():
    d = to_nemo_dict(get_preset("llama31_8b"))
    d["scale_positional_embedding"] = False
    d["seq_len_interpolation_factor"] = 4
    with pytest.raises(ConfigError, match="seq_len_interpolation_factor=4"):
        from_nemo_dict(d)


@pytest.mark.parametrize("key, value", [
    ("normalization", "layernorm"), ("activation", "gelu"), ("bias", True),
    ("position_embedding_type", "learned_absolute"), ("rotary_percentage", 0.5),
    ("transformer_block_type", "post_ln"), ("mcore_gpt", False), ("num_moe_experts", 8),
    ("qk_layernorm", True), ("share_embeddings_and_output_weights", True),
    ("precision", "fp8"), ("num_query_groups", 3),
])
def test_unsupported_values_name_the_key(key, value):
    d = to_nemo_dict(get_preset("minitron_4b_width"))
    d[key] = value
    with pytest.raises(ConfigError, match=key):
        from_nemo_dict(d)


def test_missing_and_unresolvable_keys(tmp_path):
    d = to_nemo_dict(get_preset("tiny_llama31"))
    del d["num_layers"]
    with pytest.raises(ConfigError, match="missing required key.*num_layers"):
        from_nemo_dict(d)
    d = to_nemo_dict(get_preset("tiny_llama31"))
    d["hidden_size"] = "${model.hidden}"
    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="hidden_size"):
        read_nemo_config(str(path))


def test_vocab_size_disagreement():
    d = to_nemo_dict(get_preset("tiny_llama31"))
    with pytest.raises(ConfigError, match="vocab_size=128256 but the tokenizer has 32000"):
        from_nemo_dict(d, vocab_size=32000)


def test_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_nemo_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(CheckpointError, match="not a valid YAML"):
        read_nemo_config(str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(CheckpointError, match="mapping"):
        read_nemo_config(str(bad))


# Keys of NeMo 24.05's own Llama model config whose value legitimately differs in ours, and why.
# Everything else NeMo's file has, ours has with the same value (test below).
ARCHITECTURE_AND_LAYOUT = {  # set from the model itself, or from the converter's arguments
    "encoder_seq_length", "max_position_embeddings", "num_layers", "hidden_size", "ffn_hidden_size",
    "num_attention_heads", "num_query_groups", "kv_channels", "init_method_std", "rotary_base",
    "layernorm_epsilon", "make_vocab_size_divisible_by", "tokenizer", "precision",
    "micro_batch_size", "global_batch_size", "tensor_model_parallel_size",
    "pipeline_model_parallel_size"}
DELIBERATE = {
    "apply_query_key_layer_scaling": "HF Llama has no layer-number scaling (Megatron's only "
                                     "changes fp16 rounding)",
    "use_cpu_initialization": "NeMo's converter sets true (weights initialized on the CPU at every "
                              "restore: slow at 8B); the container has GPUs",
    "seq_len_interpolation_factor": "never written: with llama3 scaling it scales RoPE twice",
    "data": "training data paths are the training job's, not the checkpoint's",
}


def test_every_key_of_nemos_llama_config_with_llamas_value():
    """Key by key against NeMo 24.05's megatron_llama_config.yaml model section as its Llama
    converter writes it (tests/data): every key present in ours with the same value, except the
    architecture/layout keys (ours: the model's) and the deliberate differences above."""
    theirs = yaml.safe_load(open(NEMO2405))
    ours = to_nemo_dict(get_preset("llama31_8b"))
    missing = sorted(set(theirs) - set(ours) - set(DELIBERATE))
    assert not missing, f"NeMo reads keys we do not write: {missing}"
    differ = {k: (ours[k], theirs[k]) for k in theirs
              if k not in ARCHITECTURE_AND_LAYOUT and k not in DELIBERATE and ours[k] != theirs[k]}
    assert not differ, differ
    assert ours["hidden_dropout"] == ours["attention_dropout"] == ours["ffn_dropout"] == 0.0
    assert ours["kv_channels"] == 128 and ours["megatron_amp_O2"] is False
