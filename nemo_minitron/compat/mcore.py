"""The one place that knows how Megatron-Core versions differ (0.7.0 in NeMo 24.05 ... 0.16.x).

Callers ask questions ("which layer spec?", "does GPTModel take rope_scaling?") instead of testing
versions themselves.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata

import torch


@functools.lru_cache(maxsize=None)
def mcore_version() -> tuple:
    """megatron-core's version as a tuple of ints, e.g. (0, 7, 0)."""
    for dist in ("megatron-core", "megatron_core"):
        try:
            text = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        import megatron.core

        text = getattr(megatron.core, "__version__", "0")
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def has_rope_scaling_arg() -> bool:
    """GPTModel(rope_scaling=...) exists from megatron-core 0.10 (factor knob from 0.11)."""
    import inspect

    from megatron.core.models.gpt import GPTModel

    return "rope_scaling" in inspect.signature(GPTModel.__init__).parameters


def pipeline_shapes_adjustable() -> bool:
    """The 1F1B pipeline schedule takes ``adjust_tensor_shapes_fn``: megatron-core 0.16.1 yes,
    0.7.0 (NeMo 24.05) no."""
    import inspect

    from megatron.core.pipeline_parallel import schedules

    fn = schedules.forward_backward_pipelining_without_interleaving
    return "adjust_tensor_shapes_fn" in inspect.signature(fn).parameters


def wide_pipeline_schedule_kwargs(config, adjust_tensor_shapes) -> dict:
    """What makes the pipeline schedule send and receive activations of other shapes than
    ``[(s, b, config.hidden_size)]``; ``adjust_tensor_shapes(recv, send) -> (recv, send)``.

    Where the schedule takes ``adjust_tensor_shapes_fn``, that. megatron-core 0.7.0 has no such
    argument, but its p2p layer sends each tensor's shape ahead of the tensor (three int64 per
    message) when ``config.variable_seq_lengths`` is set, and allocates what it receives from
    that: the model's config is switched to it (nothing else in 0.7.0 reads the flag)."""
    if pipeline_shapes_adjustable():
        return dict(adjust_tensor_shapes_fn=adjust_tensor_shapes)
    config.variable_seq_lengths = True
    return {}


def te_usable() -> bool:
    """Transformer Engine spec is usable: real TE importable and a GPU present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


class RMSNorm(torch.nn.Module):
    """RMSNorm with Megatron's norm constructor, for megatron-core < 0.10 whose local spec has
    no RMSNorm without apex. Computes in fp32 like HF's LlamaRMSNorm."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.config = config
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def local_layer_spec():
    """Megatron's local (non-TE) GPT layer spec with RMSNorm, on every supported version."""
    from megatron.core.models.gpt import gpt_layer_specs

    import inspect

    params = inspect.signature(gpt_layer_specs.get_gpt_layer_local_spec).parameters
    if "normalization" in params:
        return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = gpt_layer_specs.get_gpt_layer_local_spec()
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def te_layer_spec():
    """Megatron's Transformer Engine GPT layer spec (fused norms in linear_qkv / linear_fc1)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from nemo_minitron.errors import ConfigError

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise ConfigError("the Transformer Engine layer spec was requested but transformer_engine "
                          "is not installed (use the local spec: use_te=False)") from None
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


@contextlib.contextmanager
def final_norm_for_local_spec():
    """megatron-core < 0.8 builds the final norm as TENorm whatever the spec; with the local spec
    (no TE) it must be an RMSNorm. Scoped to model construction."""
    from megatron.core.transformer import transformer_block

    if not hasattr(transformer_block, "TENorm") or mcore_version() >= (0, 8, 0):
        yield
        return
    original = transformer_block.TENorm
    transformer_block.TENorm = RMSNorm
    try:
        yield
    finally:
        transformer_block.TENorm = original


# ---- KV-cache inference ---------------------------------------------------------------------
# megatron-core 0.7 (NeMo 24.05): ``megatron.core.InferenceParams`` passed as
# ``GPTModel.forward(inference_params=...)``; logits come back vocab-sharded under TP.
# megatron-core >= 0.12: ``StaticInferenceContext`` passed as ``inference_context=...``, and the
# model asserts ``runtime_gather_output=True`` in inference mode, so the logits come back gathered
# over TP (only the last position's, ``materialize_only_last_token_logits``).
# Both keep the cache in ``key_value_memory_dict`` and advance with ``sequence_len_offset``; both
# accept a multi-token first (prefill) step from offset 0, then one token per step (0.7 slices the
# query RoPE to the last position after the first step).


def _has_static_context() -> bool:
    try:
        from megatron.core.inference.contexts import StaticInferenceContext  # noqa: F401
    except ImportError:
        return False
    return True


def new_kv_cache(max_batch_size: int, max_sequence_length: int):
    """An empty static KV cache for ``max_batch_size`` sequences of ``max_sequence_length``."""
    if _has_static_context():
        from megatron.core.inference.contexts import StaticInferenceContext

        return StaticInferenceContext(max_batch_size, max_sequence_length)
    from megatron.core import InferenceParams

    return InferenceParams(max_batch_size, max_sequence_length)


def kv_cache_forward_kwargs(cache) -> dict:
    """The ``GPTModel.forward`` keyword arguments that make it read and extend ``cache``."""
    if _has_static_context():
        return {"inference_context": cache, "runtime_gather_output": True}
    return {"inference_params": cache}


def kv_cache_logits_gathered() -> bool:
    """Whether ``GPTModel.forward`` with a KV cache returns logits already gathered over TP."""
    return _has_static_context()


def gather_tp_last_dim(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather ``tensor`` over the tensor-parallel group along its last dimension."""
    from megatron.core.tensor_parallel import mappings

    return mappings.gather_from_tensor_model_parallel_region(tensor)

