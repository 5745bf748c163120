"""HF ``config.json`` <-> :class:`ModelConfig`, through one table of field pairs used both ways.

Reads both styles transformers has written: 4.x (``rope_theta`` + ``rope_scaling``, ``torch_dtype``)
and 5.x (``rope_parameters`` holding ``rope_theta``, ``dtype``). Writes the style of the released
checkpoints (``rope_theta`` + ``rope_scaling``, ``torch_dtype``, explicit ``head_dim``), which
transformers >= 4.45, 5.x, vLLM and TensorRT-LLM all read.

Anything the family cannot represent (another rope type, biases, tied embeddings, an activation
other than SiLU, quantization) is an error naming the key, never silently dropped.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Mapping, Tuple

from nemo_minitron.config.arch import ModelConfig, RopeScaling
from nemo_minitron.errors import CheckpointError, ConfigError

# (HF config.json key, ModelConfig field); the reverse direction reads the same table.
HF_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("head_dim", "head_dim"),
    ("vocab_size", "vocab_size"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("rms_norm_eps", "norm_eps"),
    ("tie_word_embeddings", "tie_word_embeddings"),
    ("initializer_range", "init_method_std"),
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
)

# Keys whose value is fixed for this family; written as is, checked on read.
HF_FIXED: Dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
}

# Keys that carry no architecture (runtime or bookkeeping); accepted and dropped on read.
HF_IGNORED = frozenset({
    "transformers_version", "use_cache", "_name_or_path", "attention_dropout", "pad_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "_attn_implementation_autoset", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "problem_type", "chunk_size_feed_forward", "output_scores", "return_dict_in_generate",
})

# Keys a config.json may omit: head_dim (transformers then uses hidden/heads, see below) and two
# whose transformers default equals this family's (untied embeddings, init std 0.02). Every other
# field is required, since transformers' defaults (rms_norm_eps 1e-6, bos 1, eos 2) are wrong here.
_HF_OPTIONAL = frozenset({"head_dim", "tie_word_embeddings", "initializer_range"})

# Written on export but not part of ModelConfig (training knobs with fixed values).
_HF_WRITE_ONLY = {"attention_dropout": 0.0, "use_cache": True}


def _check_rope(rope: Mapping, where: str):
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", None))
    if rope_type in (None, "default"):
        if rope:
            raise ConfigError(f"{where}: unexpected keys {sorted(rope)} for rope_type=default")
        return None
    if rope_type != "llama3":
        raise ConfigError(f"{where}.rope_type={rope_type!r} is not supported: the Llama-3.1 family "
                          "uses 'llama3' scaling (or none)")
    try:
        return RopeScaling(**rope)
    except TypeError as e:
        raise ConfigError(f"{where}: unsupported llama3 rope key(s) in {sorted(rope)} ({e})") from None


def from_hf_dict(hf: Mapping) -> ModelConfig:
    """Translate a parsed HF ``config.json`` into a :class:`ModelConfig`."""
    hf = dict(hf)
    known = {k for k, _ in HF_FIELDS} | set(HF_FIXED) | HF_IGNORED | {
        "rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype"}
    unknown = sorted(set(hf) - known)
    if unknown:
        raise ConfigError(f"config.json: unsupported key(s) {', '.join(unknown)} "
                          "(not part of the Llama-3.1 architecture)")
    for key, want in HF_FIXED.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"config.json: {key}={hf[key]!r} is not supported (this family "
                              f"needs {key}={want!r})")
    kwargs = {field: hf[key] for key, field in HF_FIELDS if key in hf and hf[key] is not None}
    missing = sorted(k for k, f in HF_FIELDS
                     if f not in kwargs and k not in _HF_OPTIONAL)
    if missing:
        raise ConfigError(f"config.json: missing required key(s) {', '.join(missing)}")
    if kwargs.get("tie_word_embeddings"):
        raise ConfigError("config.json: tie_word_embeddings=true is not supported: the Llama-3.1 "
                          "Minitron family has untied input and output embeddings")
    if "head_dim" not in kwargs:
        # transformers' own rule when the key is absent (Llama-3.1-8B's config.json has none).
        # Tensor shapes are checked against it separately (check_hf_shapes).
        heads = kwargs["num_attention_heads"]
        if kwargs["hidden_size"] % heads:
            raise ConfigError("config.json: head_dim is missing and hidden_size is not divisible "
                              "by num_attention_heads; set head_dim explicitly")
        kwargs["head_dim"] = kwargs["hidden_size"] // heads
    if "rope_parameters" in hf:  # transformers 5.x
        if "rope_theta" in hf or "rope_scaling" in hf:
            raise ConfigError("config.json: both rope_parameters (transformers 5) and "
                              "rope_theta/rope_scaling (transformers 4) are present")
        rope = dict(hf["rope_parameters"] or {})
        if "rope_theta" not in rope:
            raise ConfigError("config.json: rope_parameters.rope_theta is missing")
        kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = _check_rope(rope, "rope_parameters")
    else:
        if "rope_theta" not in hf:
            raise ConfigError("config.json: rope_theta is missing")
        kwargs["rope_theta"] = hf["rope_theta"]
        scaling = hf.get("rope_scaling")
        kwargs["rope_scaling"] = None if scaling is None else _check_rope(scaling, "rope_scaling")
    dtype = hf.get("torch_dtype", hf.get("dtype"))
    if dtype is not None:
        kwargs["dtype"] = str(dtype).replace("torch.", "")
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        msg = str(e)
        aliases = [f"{field} is {key}" for key, field in HF_FIELDS if key != field and field in msg]
        raise ConfigError(f"config.json: {msg}" + (f" ({'; '.join(aliases)} in config.json)"
                                                   if aliases else "")) from None


def to_hf_dict(cfg: ModelConfig) -> dict:
    """The ``config.json`` content for ``cfg``, in the style of the released checkpoints."""
    out = dict(HF_FIXED)
    out.update(_HF_WRITE_ONLY)
    for key, field in HF_FIELDS:
        value = getattr(cfg, field)
        out[key] = list(value) if isinstance(value, tuple) else value
    out["rope_theta"] = float(cfg.rope_theta)
    out["rope_scaling"] = None if cfg.rope_scaling is None else {
        "rope_type": "llama3",
        "factor": float(cfg.rope_scaling.factor),
        "low_freq_factor": float(cfg.rope_scaling.low_freq_factor),
        "high_freq_factor": float(cfg.rope_scaling.high_freq_factor),
        "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings,
    }
    out["torch_dtype"] = cfg.dtype
    return dict(sorted(out.items()))


def read_hf_config(path: str) -> ModelConfig:
    """Read ``config.json`` from an HF checkpoint directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: no such file (an HF checkpoint directory needs config.json)")
    try:
        with open(file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    try:
        return from_hf_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def write_hf_config(cfg: ModelConfig, directory: str) -> str:
    file = os.path.join(directory, "config.json")
    with open(file, "w") as f:
        json.dump(to_hf_dict(cfg), f, indent=2)
        f.write("\n")
    return file


def expected_hf_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the HF ``LlamaForCausalLM`` checkpoint with its shape, in transformers'
    state-dict order."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (cfg.q_size, h),
            p + "self_attn.k_proj.weight": (cfg.kv_size, h),
            p + "self_attn.v_proj.weight": (cfg.kv_size, h),
            p + "self_attn.o_proj.weight": (h, cfg.q_size),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_hf_shapes(cfg: ModelConfig, shapes: Mapping[str, Iterable[int]]) -> None:
    """Check a checkpoint's tensor names and shapes against ``cfg``; one error naming every problem.

    A q_proj whose rows are a multiple of num_attention_heads other than head_dim gets its own
    diagnosis, since a missing or derived head_dim (hidden/heads) is this family's classic bug.
    """
    want = expected_hf_shapes(cfg)
    got = {k: tuple(v) for k, v in shapes.items()}
    q = got.get("model.layers.0.self_attn.q_proj.weight")
    if q is not None and q != want["model.layers.0.self_attn.q_proj.weight"] and len(q) == 2 \
            and q[1] == cfg.hidden_size and q[0] % cfg.num_attention_heads == 0 \
            and q[0] // cfg.num_attention_heads != cfg.head_dim:
        raise ConfigError(
            f"head_dim={cfg.head_dim} is inconsistent with the weights: "
            f"model.layers.0.self_attn.q_proj.weight has {q[0]} rows = {cfg.num_attention_heads} "
            f"heads x {q[0] // cfg.num_attention_heads}; set head_dim: "
            f"{q[0] // cfg.num_attention_heads} in config.json")
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(f"{k} {list(got[k])} (expected {list(want[k])})"
                   for k in set(want) & set(got) if got[k] != want[k])
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ConfigError("checkpoint does not match config.json: " + "; ".join(problems))
