"""NeMo ``model_config.yaml`` <-> :class:`ModelConfig`.

Written: the keys NeMo 24.05's ``MegatronGPTModel`` reads for this family (shared/FACTS.md section 3),
``scale_positional_embedding: true`` which later NeMo (24.09+) reads to apply llama3 RoPE, and the
llama3 constants under the names NeMo 2's ``Llama31Config`` uses (``scale_factor``,
``low_freq_factor``, ``high_freq_factor``, ``old_context_len``). ``seq_len_interpolation_factor`` is
never written: together with llama3 scaling it scales RoPE twice (the NeMo 24.09-2.1 converter bug).
``vocab_size`` is informational (NeMo takes the vocabulary from the tokenizer and ignores it).

Read: configs we wrote and configs NeMo wrote (24.05 and later), which also hold training
settings (optim, data, trainer...). Architecture keys are checked; other keys are not ours to judge
and are ignored.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Mapping, Optional, Tuple

from nemo_minitron.config.arch import ModelConfig, RopeScaling
from nemo_minitron.errors import CheckpointError, ConfigError

# (NeMo model_config.yaml key, ModelConfig field); used in both directions.
NEMO_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("num_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_query_groups"),
    ("kv_channels", "head_dim"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("rotary_base", "rope_theta"),
    ("layernorm_epsilon", "norm_eps"),
    ("share_embeddings_and_output_weights", "tie_word_embeddings"),
    ("init_method_std", "init_method_std"),
    ("make_vocab_size_divisible_by", "make_vocab_size_divisible_by"),
    ("vocab_size", "vocab_size"),
)

# llama3 RoPE constants, under NeMo 2 Llama31Config's names.
NEMO_ROPE_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("scale_factor", "factor"),
    ("low_freq_factor", "low_freq_factor"),
    ("high_freq_factor", "high_freq_factor"),
    ("old_context_len", "original_max_position_embeddings"),
)

# Architecture keys with the only values this family supports (the first is written).
NEMO_FIXED: Dict[str, tuple] = {
    "mcore_gpt": (True,),
    "normalization": ("rmsnorm",),
    "activation": ("fast-swiglu", "swiglu"),
    "bias": (False,),
    "position_embedding_type": ("rope",),
    "rotary_percentage": (1.0,),
    "transformer_block_type": ("pre_ln",),
}

# Keys that would change the architecture in ways this family does not have.
NEMO_UNSUPPORTED_IF_SET: Dict[str, object] = {
    "num_moe_experts": None, "qk_layernorm": False, "rotary_interleaved": False,
    "apply_residual_connection_post_layernorm": False, "normalize_attention_scores": True,
    "headscale": False,
}

# The rest of what NeMo 2.0.0rc0 (24.05) reads from a restored model config, with the values right
# for Llama-3.1: the ``model:`` section of NeMo's own examples/.../megatron_llama_config.yaml (what
# its HF->NeMo Llama converter writes beside the architecture). A key NeMo does not find falls back
# to a default that is wrong for Llama (``hidden_dropout``, ``attention_dropout``: 0.1) or fails the
# restore (``optim``: MegatronBaseModel.__init__ reads it). Deliberate differences from that file
# (tests/test_config_nemo.py compares key by key, tests/test_nemo_real.py restores in NeMo):
# ``apply_query_key_layer_scaling`` false (HF Llama has no layer-number scaling; Megatron's only
# changes fp16 rounding), ``use_cpu_initialization`` false (NeMo's converter sets true: weights
# initialized on the CPU at every restore). ``megatron_amp_O2`` is false as in that file (true, as
# we wrote before, broke NeMo's megatron_gpt_eval.py at precision 32: "Either config.fp16 or
# config.bf16 should be True").
NEMO_RESTORE_DEFAULTS: Dict[str, object] = {
    "virtual_pipeline_model_parallel_size": None,
    "use_scaled_init_method": True,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "ffn_dropout": 0.0,
    "apply_query_key_layer_scaling": False,
    "do_layer_norm_weight_decay": False,
    "pre_process": True,
    "post_process": True,
    "persist_layer_norm": True,
    "headscale": False,
    "openai_gelu": False,
    "normalize_attention_scores": True,
    "attention_type": "multihead",
    "overlap_p2p_comm": False,
    "batch_p2p_comm": True,
    "native_amp_init_scale": 4294967296,
    "native_amp_growth_interval": 1000,
    "hysteresis": 2,
    "fp32_residual_connection": False,
    "fp16_lm_cross_entropy": False,
    "grad_allreduce_chunk_size_mb": 125,
    "grad_div_ar_fusion": True,
    "gradient_accumulation_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_add_fusion": False,
    "masked_softmax_fusion": True,
    "get_attention_mask_from_fusion": True,
    "apply_rope_fusion": False,
    "seed": 1234,
    "resume_from_checkpoint": None,
    "use_cpu_initialization": False,
    "onnx_safe": False,
    "apex_transformer_log_level": 30,
    "gradient_as_bucket_view": True,
    "sync_batch_comm": False,
    "activations_checkpoint_granularity": None,
    "activations_checkpoint_method": None,
    "activations_checkpoint_num_layers": None,
    "num_micro_batches_with_partial_activation_checkpoints": None,
    "activations_checkpoint_layers_per_pipeline": None,
    "sequence_parallel": False,
    "fp8": False,
    "fp8_e4m3": False,
    "fp8_hybrid": True,
    "fp8_margin": 0,
    "fp8_interval": 1,
    "fp8_amax_history_len": 1024,
    "fp8_amax_compute_algo": "max",
    "reduce_amax": True,
    "use_emha": False,
    # NeMo's pretraining defaults; its fine-tuning scripts replace the whole section
    "optim": {"name": "fused_adam", "lr": 2e-4, "weight_decay": 0.01, "betas": [0.9, 0.98],
              "sched": {"name": "CosineAnnealing", "warmup_steps": 500, "constant_steps": 50000,
                        "min_lr": 2e-5}},
}

PRECISION_TO_DTYPE = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", "16": "float16",
                      "16-mixed": "float16", "32": "float32", "32-true": "float32"}
DTYPE_TO_PRECISION = {"bfloat16": "bf16", "float16": 16, "float32": 32}


# The family shares Llama-3's tokenizer; this hub repo is not gated (meta-llama/* repos are).
DEFAULT_TOKENIZER = {"library": "huggingface", "type": "nvidia/Llama-3.1-Minitron-4B-Width-Base",
                     "use_fast": True}


class DoubleRopeScalingError(ConfigError):
    """llama3 scaling and linear interpolation were both set (NeMo 24.09-2.1 converters)."""


def to_nemo_dict(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, precision: Optional[str] = None,
                 tokenizer: Optional[Mapping] = None, seq_length: Optional[int] = None,
                 micro_batch_size: int = 1, global_batch_size: Optional[int] = None,
                 dist_ckpt_format: str = "torch_dist", transformer_engine: bool = True) -> dict:
    """A NeMo ``model_config.yaml`` (as a dict) for ``cfg`` at the given parallel layout."""
    if seq_length is None:
        seq_length = (cfg.rope_scaling.original_max_position_embeddings if cfg.rope_scaling
                      else cfg.max_position_embeddings)
    out = {"mcore_gpt": True}
    for key, field in NEMO_FIELDS:
        out[key] = getattr(cfg, field)
    out["rotary_base"] = float(cfg.rope_theta)
    out.update({k: v[0] for k, v in NEMO_FIXED.items()})
    out["encoder_seq_length"] = seq_length
    out["scale_positional_embedding"] = cfg.rope_scaling is not None
    if cfg.rope_scaling is not None:
        for key, field in NEMO_ROPE_FIELDS:
            out[key] = getattr(cfg.rope_scaling, field)
    out.update({
        "precision": precision if precision is not None else DTYPE_TO_PRECISION[cfg.dtype],
        "tokenizer": dict(tokenizer) if tokenizer is not None else dict(DEFAULT_TOKENIZER),
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "micro_batch_size": micro_batch_size,
        "global_batch_size": global_batch_size if global_batch_size is not None else micro_batch_size,
        "megatron_amp_O2": False,
        "transformer_engine": transformer_engine,
        "dist_ckpt_format": dist_ckpt_format,
    })
    out.update(copy.deepcopy(NEMO_RESTORE_DEFAULTS))
    return out


def _check_fixed(nemo: Mapping):
    for key, allowed in NEMO_FIXED.items():
        if key in nemo and nemo[key] is not None and nemo[key] not in allowed:
            raise ConfigError(f"model_config.yaml: {key}={nemo[key]!r} is not supported (this family "
                              f"needs {key}={allowed[0]!r})")
    for key, neutral in NEMO_UNSUPPORTED_IF_SET.items():
        if key in nemo and nemo[key] != neutral:
            raise ConfigError(f"model_config.yaml: {key}={nemo[key]!r} is not supported by the "
                              "Llama-3.1 family")
    if not nemo.get("mcore_gpt", False):
        raise ConfigError("model_config.yaml: mcore_gpt is not true (legacy NeMo GPT models are "
                          "not supported)")


def read_rope_scaling(nemo: Mapping, repair_double_rope: bool = False) -> Optional[RopeScaling]:
    """The llama3 RoPE scaling a NeMo model config asks for (``scale_positional_embedding``), or
    None; raises :class:`DoubleRopeScalingError` when linear interpolation is set too."""
    llama3 = bool(nemo.get("scale_positional_embedding", False))
    interp = nemo.get("seq_len_interpolation_factor")
    if interp is not None and llama3:
        if not repair_double_rope:
            raise DoubleRopeScalingError(
                f"model_config.yaml: scale_positional_embedding=true together with "
                f"seq_len_interpolation_factor={interp} scales RoPE twice (written by NeMo "
                "24.09-2.1 converters); remove seq_len_interpolation_factor")
    elif interp is not None:
        raise ConfigError(f"model_config.yaml: seq_len_interpolation_factor={interp} (linear RoPE "
                          "interpolation) is not supported: this family uses llama3 scaling")
    if not llama3:
        return None
    kwargs = {field: nemo[key] for key, field in NEMO_ROPE_FIELDS if nemo.get(key) is not None}
    return RopeScaling(**kwargs)  # absent constants: Llama-3.1's (NeMo 24.09+ hard-codes them)


def from_nemo_dict(nemo: Mapping, *, vocab_size: Optional[int] = None,
                   repair_double_rope: bool = False) -> ModelConfig:
    """Translate a NeMo model config into a :class:`ModelConfig`.

    ``vocab_size``: the tokenizer's vocabulary, for configs NeMo wrote (they carry none); when the
    yaml has ``vocab_size`` too, both must agree. ``repair_double_rope``: accept a config with both
    llama3 scaling and ``seq_len_interpolation_factor`` and keep llama3 scaling only.
    """
    nemo = dict(nemo)
    _check_fixed(nemo)
    kwargs = {field: nemo[key] for key, field in NEMO_FIELDS if nemo.get(key) is not None}
    missing = sorted(k for k, f in NEMO_FIELDS
                     if f not in kwargs and k not in ("kv_channels", "vocab_size",
                                                      "share_embeddings_and_output_weights",
                                                      "init_method_std",
                                                      "make_vocab_size_divisible_by"))
    if missing:
        raise ConfigError(f"model_config.yaml: missing required key(s) {', '.join(missing)}")
    if "head_dim" not in kwargs:
        # NeMo's and Megatron's rule when kv_channels is null; checked against weights elsewhere.
        if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
            raise ConfigError("model_config.yaml: kv_channels is null and hidden_size is not "
                              "divisible by num_attention_heads")
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if "make_vocab_size_divisible_by" not in kwargs:
        kwargs["make_vocab_size_divisible_by"] = 128  # NeMo's default
    if kwargs.get("tie_word_embeddings", True):
        raise ConfigError("model_config.yaml: share_embeddings_and_output_weights must be false: the "
                          "Llama-3.1 Minitron family has untied input and output embeddings")
    if vocab_size is not None:
        if kwargs.get("vocab_size", vocab_size) != vocab_size:
            raise ConfigError(f"model_config.yaml: vocab_size={kwargs['vocab_size']} but the "
                              f"tokenizer has {vocab_size} tokens")
        kwargs["vocab_size"] = vocab_size
    elif "vocab_size" not in kwargs:
        raise ConfigError("model_config.yaml carries no vocab_size (NeMo takes it from the "
                          "tokenizer): pass the tokenizer's vocabulary size")
    kwargs["rope_scaling"] = read_rope_scaling(nemo, repair_double_rope)
    precision = nemo.get("precision")
    if precision is not None:
        dtype = PRECISION_TO_DTYPE.get(str(precision))
        if dtype is None:
            raise ConfigError(f"model_config.yaml: precision={precision!r} is not one of "
                              f"{', '.join(PRECISION_TO_DTYPE)}")
        kwargs["dtype"] = dtype
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"model_config.yaml: {e}") from None


def load_yaml(path: str) -> dict:
    """Load a YAML config with OmegaConf, resolving ``${...}`` interpolations key by key.

    NeMo's saved configs may hold interpolations that only resolve inside a full training config
    (``seq_length: ${model.encoder_seq_length}``); such a value is kept as its raw string, so an
    unresolvable *architecture* key fails later with an error that names it, and an unresolvable
    training key that nobody reads does no harm.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        conf = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: not a valid YAML config ({type(e).__name__}: {first})") \
            from None
    if not OmegaConf.is_dict(conf):
        raise CheckpointError(f"{path}: expected a mapping at the top level")
    return _resolve_each(conf)


def _resolve_each(conf) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(conf, resolve=False)
    out = {}
    for key in raw:
        node = conf._get_node(key)
        if OmegaConf.is_dict(node):
            out[key] = _resolve_each(node)
            continue
        try:
            value = conf[key]
            out[key] = OmegaConf.to_container(value, resolve=True) \
                if OmegaConf.is_config(value) else value
        except OmegaConfBaseException:
            out[key] = raw[key]
    return out


def read_nemo_config(path: str, label: Optional[str] = None, **kwargs) -> ModelConfig:
    """Read a model_config.yaml (``label``: the name to show in errors, e.g. the .nemo file)."""
    data = load_yaml(path)
    label = label or path
    if "model" in data and isinstance(data["model"], dict) and "num_layers" not in data:
        data = data["model"]  # a full NeMo training config (trainer/model/...)
    try:
        return from_nemo_dict(data, **kwargs)
    except ConfigError as e:
        raise type(e)(f"{label}: {e}") from None


def dump_yaml(data: Mapping) -> str:
    import yaml

    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)
