"""ModelConfig -> Megatron-Core ``TransformerConfig`` and ``GPTModel`` arguments.

Two cases: the GPU case (Transformer Engine layer spec, fusions as Megatron defaults them) and the
CPU case (local layer spec with RMSNorm, CPU initialization, every fusion off). Llama-3.1 RoPE
scaling is *not* passed to GPTModel: megatron-core < 0.10 has no option for it and newer versions
hard-code Llama-3.1's constants, so ``nemo_minitron.model.rope`` sets the scaled frequencies on every
version, exactly once (``gpt_model_kwargs`` always passes ``rope_scaling=False`` where it exists).

    >>> tc = to_transformer_config(get_preset("minitron_4b_width"), tp=2, dtype="bfloat16")
    >>> tc.kv_channels
    128
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.parallel import validate_parallel
from nemo_minitron.errors import ConfigError

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "16": "float16",
               "32": "float32"}
    key = aliases.get(str(name), str(name).replace("torch.", ""))
    if key not in _TORCH_DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of bf16, fp16, fp32")
    return _TORCH_DTYPES[key]


def transformer_config_kwargs(cfg: ModelConfig, *, tp: int = 1, pp: int = 1,
                              dtype: str = "float32", cpu: Optional[bool] = None,
                              sequence_parallel: bool = False) -> dict:
    """Keyword arguments of ``TransformerConfig`` for ``cfg`` (validated layout first).

    ``cpu``: CPU build (fusions off, CPU initialization); default: when CUDA is absent.
    """
    validate_parallel(cfg, tp, pp)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    params_dtype = torch_dtype(dtype)
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
    )
    if cpu:
        kwargs.update(use_cpu_initialization=True, gradient_accumulation_fusion=False,
                      bias_activation_fusion=False, masked_softmax_fusion=False,
                      apply_rope_fusion=False, bias_dropout_fusion=False,
                      persist_layer_norm=False, cross_entropy_loss_fusion=False)
    return kwargs


def to_transformer_config(cfg: ModelConfig, **kwargs):
    """A Megatron-Core ``TransformerConfig`` (arguments as :func:`transformer_config_kwargs`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    values = transformer_config_kwargs(cfg, **kwargs)
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    # Fields added in later versions (e.g. cross_entropy_loss_fusion) are only ever set to their
    # off value here, so dropping them on older versions changes nothing.
    essential = {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "normalization", "gated_linear_unit"}
    missing = essential - known
    if missing:
        raise ConfigError(f"this megatron-core lacks TransformerConfig fields {sorted(missing)}")
    return TransformerConfig(**{k: v for k, v in values.items() if k in known})


def gpt_model_kwargs(cfg: ModelConfig, *, tp: int = 1, use_te: Optional[bool] = None,
                     pre_process: bool = True, post_process: bool = True,
                     parallel_output: bool = True) -> dict:
    """Keyword arguments of ``GPTModel`` besides ``config``: layer spec, padded vocab, RoPE base.

    ``use_te``: Transformer Engine layer spec; default: when TE and a GPU are usable.
    """
    from nemo_minitron.compat import mcore

    if use_te is None:
        use_te = mcore.te_usable()
    kwargs = dict(
        transformer_layer_spec=mcore.te_layer_spec() if use_te else mcore.local_layer_spec(),
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
    )
    if mcore.has_rope_scaling_arg():
        kwargs["rope_scaling"] = False  # applied by nemo_minitron.model.rope, on every version
    return kwargs
