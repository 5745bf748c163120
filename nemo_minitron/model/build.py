"""Build a Megatron-Core GPTModel for a family config (parallel state must be initialized)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.megatron import gpt_model_kwargs, to_transformer_config
from nemo_minitron.model.rope import apply_rope


def build_gpt_model(cfg: ModelConfig, *, dtype: str = "float32", use_te: Optional[bool] = None,
                    parallel_output: bool = True, config_overrides: Optional[dict] = None,
                    init_weights: bool = True, attention_backend: str = "auto"):
    """This rank's part of the model at the TP/PP that ``megatron.core.parallel_state`` holds.

    ``config_overrides``: extra ``TransformerConfig`` fields for how the model runs, not what it
    is (e.g. activation recomputation: ``recompute_granularity="full"``).

    ``init_weights=False``: Megatron's random init is skipped (``perform_initialization=False``:
    the weights are left as allocated, uninitialized), for a caller that fills every weight next,
    e.g. with ``load_hf_into_model`` (strict: every parameter is written). Drawing the random
    weights was 11 of the 12.6 s of building a 4-layer Minitron-4B-Width on the CPU.

    ``attention_backend``: the local spec's core attention, auto | sdpa | megatron
    (nemo_minitron/model/attention.py; auto: torch SDPA on a GPU, Megatron's on the CPU)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from nemo_minitron.compat import cpu, mcore

    if not torch.cuda.is_available():
        cpu.activate()
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = to_transformer_config(cfg, tp=tp, pp=pp, dtype=dtype)
    if not init_weights:
        config = dataclasses.replace(config, perform_initialization=False)
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)  # re-validated by __post_init__
    kwargs = gpt_model_kwargs(cfg, tp=tp, use_te=use_te, parallel_output=parallel_output,
                              pre_process=ps.is_pipeline_first_stage(),
                              post_process=ps.is_pipeline_last_stage())
    from nemo_minitron.model.attention import (SDPAttention, resolve_attention_backend,
                                               with_core_attention)

    te = use_te if use_te is not None else mcore.te_usable()
    if resolve_attention_backend(attention_backend, te) == "sdpa":
        kwargs["transformer_layer_spec"] = with_core_attention(kwargs["transformer_layer_spec"],
                                                               SDPAttention)
    with mcore.final_norm_for_local_spec():
        model = GPTModel(config=config, **kwargs)
    place_parameters(model, config.params_dtype)
    apply_rope(model, cfg)
    return model


def place_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter in ``dtype`` and, where CUDA is, on this rank's GPU, as Megatron-LM's
    ``get_model`` does (``.cuda()``, then ``Float16Module``'s cast). Megatron's own layers already
    are, but the local spec's norms without apex are plain ``torch.nn.RMSNorm``s, built in fp32
    on the CPU whatever the config says (on a GPU: "weight is on cpu" in the first forward; in
    bf16: fp32 parameters the mixed-precision optimizer and the fused norm kernel refuse)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    from nemo_minitron.dist import compute_device

    model.to(compute_device())
