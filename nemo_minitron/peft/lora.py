"""LoRA adapters on a built Megatron-Core GPTModel, tensor-parallel aware.

    model = build_train_model(cfg, hf_dir=BASE, use_te=False)
    spec = LoRASection(target_modules=["linear_qkv", "linear_fc2"], rank=16, alpha=32, dropout=0.05)
    apply_lora(model, cfg, spec)        # base frozen; only adapters require grad

``spec`` is anything with ``target_modules``, ``rank``, ``alpha`` and ``dropout`` (the recipe's
``lora`` section, ``nemo_minitron.train.config.LoRASection``).

Each targeted linear ``y = W x`` becomes ``y = W x + (alpha/r) * B A dropout(x)``, computed in a forward
hook, so the base module, its parameter names and the HF mapping are untouched (the adapters live
as ``<linear>.adapter.lora_a`` / ``.lora_b``; ``mapping.model_params`` leaves them out).

Shapes come from the wrapped layer's own weight (``[out/TP, in]`` or ``[out, in/TP]``), never from
``hidden_size``: ``linear_proj``'s input is ``heads * head_dim`` (4096 for Minitron-4B-Width, whose
hidden is 3072). NeMo 24.05 used hidden_size there (shared/FACTS.md section 2); :func:`apply_lora`
asserts the derived widths against the config, so that bug cannot happen here.

Tensor parallelism:

* column-parallel targets (``linear_qkv``, ``linear_fc1``; input ``[s, b, in]`` replicated):
  ``A [r, in]`` replicated, ``B [out/TP, r]`` split like the base weight's rows (qkv by whole query
  groups, fc1 as ``[gate_r ; up_r]``). ``h = A x`` is the same on every rank; its gradient is a sum
  over the ranks' ``B`` shards, so ``h`` passes Megatron's copy-to-TP region (identity forward,
  all-reduce backward) and A's gradient is complete and identical on every rank.
* row-parallel targets (``linear_proj``, ``linear_fc2``; input ``[s, b, in/TP]``): ``A [r, in/TP]``
  split by columns like the base weight, the partial ``A_r x_r`` all-reduced over TP (reduce-from-TP
  region), ``B [out, r]`` replicated.

Dropout uses the default torch generator (as Megatron's hidden dropout does), so at TP>1 the
row-parallel targets' masks are drawn per shard; with dropout 0 TP=1 and TP=2 agree exactly.
Sequence parallelism is not supported (the inputs would be sequence-sharded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.convert.mapping import ADAPTER, is_adapter_name  # noqa: F401 - used by peft
from nemo_minitron.errors import ConfigError


@dataclass(frozen=True)
class Target:
    path: str  # module path inside a transformer layer
    parallel: str  # "column" | "row": which factor is TP-sharded (B rows | A columns)
    hf: Tuple[str, ...]  # HF module names (inside model.layers.N.) the fused weight splits into


# Megatron module name -> where it is; NeMo 24.05's names (lora_tuning.target_modules) are aliases.
TARGETS: Dict[str, Target] = {
    "linear_qkv": Target("self_attention.linear_qkv", "column",
                         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "linear_proj": Target("self_attention.linear_proj", "row", ("self_attn.o_proj",)),
    "linear_fc1": Target("mlp.linear_fc1", "column", ("mlp.gate_proj", "mlp.up_proj")),
    "linear_fc2": Target("mlp.linear_fc2", "row", ("mlp.down_proj",)),
}
ALIASES = {"attention_qkv": "linear_qkv", "attention_dense": "linear_proj", "mlp_fc1": "linear_fc1",
           "mlp_fc2": "linear_fc2", "all": None}


def resolve_targets(names: Sequence[str]) -> List[str]:
    """User target names (Megatron's or NeMo's, or ``all``) -> Megatron names in TARGETS order;
    an unknown name is a ConfigError that lists the valid ones."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    chosen = set()
    for name in names:
        if name in TARGETS:
            chosen.add(name)
        elif name in ALIASES:
            chosen.update([ALIASES[name]] if ALIASES[name] else TARGETS)
        else:
            raise ConfigError(f"lora target {name!r} does not exist; choose from "
                              f"{', '.join(list(TARGETS) + list(ALIASES))}")
    if not chosen:
        raise ConfigError("lora.target_modules is empty")
    return [n for n in TARGETS if n in chosen]


def check_spec(spec) -> List[str]:
    """Validate a LoRA config before anything is built; returns the resolved targets."""
    targets = resolve_targets(spec.target_modules)
    if isinstance(spec.rank, bool) or not isinstance(spec.rank, int) or spec.rank < 1:
        raise ConfigError(f"lora.rank={spec.rank!r} must be a positive integer")
    if not spec.alpha > 0:
        raise ConfigError(f"lora.alpha={spec.alpha!r} must be > 0")
    if not 0.0 <= spec.dropout < 1.0:
        raise ConfigError(f"lora.dropout={spec.dropout!r} must be in [0, 1)")
    return targets


def full_shape(cfg: ModelConfig, target: str) -> Tuple[int, int]:
    """(out, in) of the whole (unsharded) base weight, from the architecture."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    return {"linear_qkv": (cfg.q_size + 2 * cfg.kv_size, h), "linear_proj": (h, cfg.q_size),
            "linear_fc1": (2 * f, h), "linear_fc2": (h, f)}[target]


class LoRAAdapter(torch.nn.Module):
    """``(alpha/r) * B A dropout(x)`` for one TP rank; see the module docstring for the layout."""

    def __init__(self, parallel: str, in_features: int, out_features: int, rank: int,
                 alpha: float, dropout: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.parallel, self.scale = parallel, alpha / rank
        # on the base weight's device (a GPU under CUDA): nothing moves the model after this
        self.lora_a = torch.nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings as tpl  # 0.7.0 does not re-export both

        h = torch.nn.functional.linear(self.dropout(x), self.lora_a)  # [s, b, r]
        if self.parallel == "column":
            h = tpl.copy_to_tensor_model_parallel_region(h)
        else:
            h = tpl.reduce_from_tensor_model_parallel_region(h)
        return torch.nn.functional.linear(h, self.lora_b) * self.scale


def _add_adapter_output(module, args, kwargs, output):
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + getattr(module, ADAPTER)(x).to(out.dtype), bias


def _layers(model):
    return list(model.decoder.layers)


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def init_lora_a(full: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (a=sqrt(5)) over the *full* ``[r, in]`` matrix, as nn.Linear and peft do;
    drawn whole and then sharded, so every TP layout starts from the same adapters."""
    bound = 1.0 / math.sqrt(full.shape[1])  # gain sqrt(2/(1+5)) * sqrt(3/fan_in)
    return full.uniform_(-bound, bound, generator=generator)


def apply_lora(model, cfg: ModelConfig, spec, seed: int = 0) -> List[str]:
    """Freeze ``model`` and attach adapters to every targeted linear of this rank's layers.
    Returns the adapter parameter names. Call after the base weights are loaded."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from nemo_minitron.convert import mapping

    targets = check_spec(spec)
    if getattr(model.config, "sequence_parallel", False):
        raise ConfigError("LoRA does not support sequence parallelism")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in _layers(model):
        index = layer.layer_number - 1  # global layer index (Megatron counts from 1, across PP)
        for name in targets:
            t = TARGETS[name]
            linear = _get(layer, t.path)
            if hasattr(linear, ADAPTER):
                raise ConfigError(f"layer {index} {t.path} already has a LoRA adapter")
            if hasattr(linear, "layer_norm_weight"):  # TE's fused norm: its input is pre-norm
                raise ConfigError(f"LoRA on {t.path} needs the local layer spec (build the model "
                                  "with use_te=False): Transformer Engine fuses the norm into it")
            out_local, in_local = linear.weight.shape
            full_out, full_in = full_shape(cfg, name)
            # The 24.05 bug cannot happen: widths come from the weight, checked against the config
            want = ((full_out // tp, full_in) if t.parallel == "column"
                    else (full_out, full_in // tp))
            if (out_local, in_local) != want:
                raise ConfigError(f"layer {index} {t.path}: weight {[out_local, in_local]} does "
                                  f"not match the config's {list(want)} at TP={tp}")
            in_features = in_local if t.parallel == "column" else full_in // tp
            out_features = out_local if t.parallel == "column" else full_out
            adapter = LoRAAdapter(t.parallel, in_features, out_features, spec.rank, spec.alpha,
                                  spec.dropout, linear.weight.dtype, linear.weight.device)
            g = torch.Generator().manual_seed(seed * 1000003 + index * 16
                                              + list(TARGETS).index(name))
            full_a = init_lora_a(torch.empty(spec.rank, full_in), g)
            with torch.no_grad():
                adapter.lora_a.copy_(full_a if t.parallel == "column" else mapping.tp_shard(
                    base_weight_name(index, name), full_a, tp_rank, tp))
            # the TP-sharded factor counts on every rank in the grad norm; the other one once
            if t.parallel == "column":
                set_tensor_model_parallel_attributes(adapter.lora_b, True, 0, 1)
            else:
                set_tensor_model_parallel_attributes(adapter.lora_a, True, 1, 1)
            linear.add_module(ADAPTER, adapter)
            linear.register_forward_hook(_add_adapter_output, with_kwargs=True)
    return adapter_param_names(model)


# ---- naming --------------------------------------------------------------------------------------
def adapter_param_names(model) -> List[str]:
    return [n for n, _ in model.named_parameters() if is_adapter_name(n)]


def has_lora(model) -> bool:
    return any(is_adapter_name(n) for n, _ in model.named_parameters())


def iter_adapters(model) -> Iterator[Tuple[int, str, LoRAAdapter]]:
    """(global layer index, target name, adapter) on this rank."""
    for layer in _layers(model):
        for name, t in TARGETS.items():
            adapter = getattr(_get(layer, t.path), ADAPTER, None)
            if adapter is not None:
                yield layer.layer_number - 1, name, adapter


def adapter_key(layer: int, target: str, factor: str) -> str:
    """Full-model name of one factor: ``decoder.layers.3.self_attention.linear_qkv.lora_a``."""
    return f"decoder.layers.{layer}.{TARGETS[target].path}.lora_{factor}"


def _sharded(target: str, factor: str) -> bool:
    return (TARGETS[target].parallel, factor) in (("column", "b"), ("row", "a"))


def base_weight_name(layer: int, target: str) -> str:
    return f"decoder.layers.{layer}.{TARGETS[target].path}.weight"


# ---- full tensors (rank 0) and the training checkpoint -------------------------------------------
def gather_adapters(model) -> Dict[str, torch.Tensor]:
    """Collective over all ranks: every adapter factor, unsharded, under :func:`adapter_key` names,
    on global rank 0 (empty dict elsewhere). The sharded factor is reassembled like the base
    weight it belongs to (``mapping.tp_unshard``: fc1's B as ``[gate ; up]``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_minitron.convert import mapping
    from nemo_minitron.model.save import collect_on_rank0

    tp = ps.get_tensor_model_parallel_world_size()
    stage = {}
    for layer, target, adapter in iter_adapters(model):
        for factor in ("a", "b"):
            local = getattr(adapter, f"lora_{factor}").detach().cpu()
            if tp > 1 and _sharded(target, factor):
                shards = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(shards, local.contiguous(),
                                group=ps.get_tensor_model_parallel_group())
                # split like the base weight: B rows of qkv/fc1 (fc1 [gate_r ; up_r] per rank),
                # A columns of proj/fc2
                local = mapping.tp_unshard(base_weight_name(layer, target), shards)
            stage[adapter_key(layer, target, factor)] = local
    return collect_on_rank0(stage) or {}


def load_adapters(model, full: Dict[str, torch.Tensor]) -> None:
    """Copy full adapter tensors (as :func:`gather_adapters` returns them) into this rank's
    adapters, taking the TP shard; every adapter of the model must be present."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.convert import mapping
    from nemo_minitron.errors import CheckpointError

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for layer, target, adapter in iter_adapters(model):
            for factor in ("a", "b"):
                key = adapter_key(layer, target, factor)
                if key not in full:
                    raise CheckpointError(f"adapter tensor {key} is missing")
                t = full[key]
                if tp > 1 and _sharded(target, factor):
                    t = mapping.tp_shard(base_weight_name(layer, target), t, tp_rank, tp)
                param = getattr(adapter, f"lora_{factor}")
                if tuple(t.shape) != tuple(param.shape):
                    raise CheckpointError(f"{key}: {list(t.shape)} does not fit the adapter "
                                          f"{list(param.shape)} (TP={tp})")
                param.copy_(t.to(param.dtype))


def sharded_state_dict(model, prefix: str = "model.") -> dict:
    """The training checkpoint's model part for a LoRA run: the adapters only (the frozen base is
    the base model), stacked over layers like Megatron's own keys so they load at another PP.
    fc1's B goes through Megatron's SwiGLU factory where it exists (any TP); elsewhere it is
    stored in the TP layout it was trained with and must be resumed at the same TP."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    try:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    except ImportError:  # megatron-core 0.7.0
        apply_swiglu_sharded_factory = None
    num_layers = model.config.num_layers
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for layer, target, adapter in iter_adapters(model):
        offsets = ((0, layer, num_layers),)
        axis = {"lora_b": 0} if TARGETS[target].parallel == "column" else {"lora_a": 1}
        key_prefix = f"{prefix}decoder.layers.{TARGETS[target].path}.{ADAPTER}."
        sd = make_sharded_tensors_for_checkpoint(
            {"lora_a": adapter.lora_a, "lora_b": adapter.lora_b}, key_prefix, axis, offsets)
        if target == "linear_fc1":
            b = key_prefix + "lora_b"
            if apply_swiglu_sharded_factory is not None:
                sd[b] = apply_swiglu_sharded_factory(sd[b], offsets)
            elif tp > 1:
                sd[b].key = f"{sd[b].key}.tp{tp}"  # a different TP finds no key: a loud error
        here = f"{prefix}decoder.layers.{layer}.{TARGETS[target].path}.{ADAPTER}."
        out.update({here + k[len(key_prefix):]: v for k, v in sd.items()})
    return out


def load_sharded_state_dict(model, loaded: dict, prefix: str = "model.") -> None:
    with torch.no_grad():
        for layer, target, adapter in iter_adapters(model):
            for factor in ("a", "b"):
                key = (f"{prefix}decoder.layers.{layer}.{TARGETS[target].path}.{ADAPTER}."
                       f"lora_{factor}")
                getattr(adapter, f"lora_{factor}").copy_(loaded[key])
