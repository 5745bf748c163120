"""HF Llama <-> Megatron-Core weight mapping: one table of renames plus three named transforms.

Megatron names here are the *checkpoint* names (Transformer-Engine spec, shared by NeMo's distributed
checkpoints): the input RMSNorm lives at ``self_attention.linear_qkv.layer_norm_weight`` and the
post-attention RMSNorm at ``mlp.linear_fc1.layer_norm_weight``. A local-spec model (CPU) keeps them as
``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``; :func:`local_spec_name` translates.

Transforms (the reverse direction is derived from the same objects, never written twice):

* QKV: for each query group g, the heads/groups query heads of g, then K head g, then V head g,
  each head_dim rows: ``linear_qkv [groups*(heads/groups + 2)*head_dim, hidden]``.
* GATE_UP: ``linear_fc1 [2*ffn, hidden] = [gate ; up]``.
* VOCAB: embedding and output layer rows padded with zeros to Megatron's padded vocab; sliced back.

Tensor parallelism (:func:`tp_shard` / :func:`tp_unshard`): qkv, fc1, embedding and output layer
are split by rows (qkv by whole query groups, fc1 as ``[gate_r ; up_r]`` per rank), linear_proj and
fc2 by columns, norms replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import CheckpointError


# ---- transforms ---------------------------------------------------------------------------------
Alloc = Callable[[Tuple[int, ...], torch.dtype], torch.Tensor]


def _cat(parts: Sequence[torch.Tensor], dim: int, alloc: Optional[Alloc]) -> torch.Tensor:
    """``torch.cat``, into a tensor from ``alloc(shape, dtype)`` where given (e.g. a reused buffer)."""
    if alloc is None or len({p.dtype for p in parts}) != 1:
        return torch.cat(list(parts), dim=dim)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return torch.cat(list(parts), dim=dim, out=alloc(tuple(shape), parts[0].dtype))


class Transform:
    """merge: HF tensors (in table order) -> one Megatron tensor (a new one from ``alloc`` where
    given); split: the inverse."""

    def merge(self, cfg: ModelConfig, tensors: Sequence[torch.Tensor], padded_vocab: int,
              alloc: Optional[Alloc] = None):
        raise NotImplementedError

    def split(self, cfg: ModelConfig, tensor: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError


class Identity(Transform):
    def merge(self, cfg, tensors, padded_vocab, alloc=None):
        return tensors[0]

    def split(self, cfg, tensor):
        return [tensor]


class QKV(Transform):
    def merge(self, cfg, tensors, padded_vocab, alloc=None):
        q, k, v = tensors  # [heads*hd, H], [groups*hd, H], [groups*hd, H]
        g, hd, h = cfg.num_query_groups, cfg.head_dim, q.shape[1]
        per_group = [q.reshape(g, cfg.heads_per_group * hd, h), k.reshape(g, hd, h),
                     v.reshape(g, hd, h)]
        return _cat(per_group, 1, alloc).reshape(-1, h)  # [g*(hpg+2)*hd, H]

    def split(self, cfg, tensor):
        g, hd, hpg = cfg.num_query_groups, cfg.head_dim, cfg.heads_per_group
        grouped = tensor.reshape(g, (hpg + 2) * hd, tensor.shape[1])
        q, k, v = torch.split(grouped, [hpg * hd, hd, hd], dim=1)
        return [t.reshape(-1, tensor.shape[1]) for t in (q, k, v)]


class GateUp(Transform):
    def merge(self, cfg, tensors, padded_vocab, alloc=None):
        return _cat(tensors, 0, alloc)  # [gate ; up]

    def split(self, cfg, tensor):
        return list(torch.chunk(tensor, 2, dim=0))


class Vocab(Transform):
    def merge(self, cfg, tensors, padded_vocab, alloc=None):
        t = tensors[0]
        if padded_vocab == t.shape[0]:
            return t
        pad = t.new_zeros((padded_vocab - t.shape[0],) + tuple(t.shape[1:]))
        return _cat([t, pad], 0, alloc)

    def split(self, cfg, tensor):
        return [tensor[: cfg.vocab_size]]


IDENTITY, QKV_T, GATE_UP, VOCAB = Identity(), QKV(), GateUp(), Vocab()


@dataclass(frozen=True)
class Rule:
    hf: Tuple[str, ...]  # HF names ('*' = layer index), in the order merge() takes them
    megatron: str
    transform: Transform
    tp_dim: Optional[int]  # None: replicated; 0: split rows; 1: split columns


L = "model.layers.*."
D = "decoder.layers.*."
# In HF's state-dict order (so exports list tensors as transformers does).
RULES: Tuple[Rule, ...] = (
    Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", VOCAB, 0),
    Rule((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
         D + "self_attention.linear_qkv.weight", QKV_T, 0),
    Rule((L + "self_attn.o_proj.weight",), D + "self_attention.linear_proj.weight", IDENTITY, 1),
    Rule((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), D + "mlp.linear_fc1.weight",
         GATE_UP, 0),
    Rule((L + "mlp.down_proj.weight",), D + "mlp.linear_fc2.weight", IDENTITY, 1),
    Rule((L + "input_layernorm.weight",), D + "self_attention.linear_qkv.layer_norm_weight",
         IDENTITY, None),
    Rule((L + "post_attention_layernorm.weight",), D + "mlp.linear_fc1.layer_norm_weight",
         IDENTITY, None),
    Rule(("model.norm.weight",), "decoder.final_layernorm.weight", IDENTITY, None),
    Rule(("lm_head.weight",), "output_layer.weight", VOCAB, 0),
)

# Local (non-TE) spec module names of the two per-layer norms.
_LOCAL_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def local_spec_name(name: str) -> str:
    for te, local in _LOCAL_NAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def te_spec_name(name: str) -> str:
    for te, local in _LOCAL_NAMES.items():
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def _layer(rule_name: str, i: Optional[int]) -> str:
    return rule_name if i is None else rule_name.replace("*", str(i))


def megatron_names(cfg: ModelConfig) -> List[Tuple[str, Rule, Optional[int]]]:
    """Every full-model Megatron tensor as (name, rule, global layer index or None), in HF order:
    embedding, then layer by layer, then final norm and output layer."""
    per_layer = [r for r in RULES if "*" in r.megatron]
    first = [r for r in RULES if r.megatron.startswith("embedding.")]
    last = [r for r in RULES if "*" not in r.megatron and r not in first
            and not (r.megatron == "output_layer.weight" and cfg.tie_word_embeddings)]
    out = [(r.megatron, r, None) for r in first]
    for i in range(cfg.num_layers):
        out.extend((_layer(r.megatron, i), r, i) for r in per_layer)
    out.extend((r.megatron, r, None) for r in last)
    return out


_LAYER_RE = re.compile(r"^(model\.layers\.|decoder\.layers\.)(\d+)\.")


def hf_names_for(rule: Rule, layer: Optional[int]) -> List[str]:
    return [_layer(n, layer) for n in rule.hf]


def hf_to_megatron(cfg: ModelConfig, get_hf: Callable[[str], torch.Tensor], tp: int = 1,
                   names: Optional[Sequence[Tuple[str, Rule, Optional[int]]]] = None,
                   alloc: Optional[Alloc] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (Megatron name, full tensor) for ``names`` (default: all), reading HF tensors lazily
    through ``get_hf(name)``; embeddings are padded to the vocab that TP=``tp`` needs. Merged
    tensors (qkv, fc1, padded vocab) are written into ``alloc(shape, dtype)`` where given."""
    padded = cfg.padded_vocab_size(tp)
    for name, rule, layer in (names if names is not None else megatron_names(cfg)):
        hf = [get_hf(n) for n in hf_names_for(rule, layer)]
        yield name, rule.transform.merge(cfg, hf, padded, alloc)


def megatron_to_hf(cfg: ModelConfig, get_megatron: Callable[[str], torch.Tensor]
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for the whole model in HF order (embeddings sliced to the vocab)."""
    for name, rule, layer in megatron_names(cfg):
        parts = rule.transform.split(cfg, get_megatron(name))
        yield from zip(hf_names_for(rule, layer), parts)


def check_hf_names(cfg: ModelConfig, hf_names) -> None:
    """Every HF tensor is consumed by a rule and every rule finds its tensors; one error naming
    the offenders."""
    want = {n for _, rule, layer in megatron_names(cfg) for n in hf_names_for(rule, layer)}
    have = set(hf_names)
    problems = []
    if want - have:
        problems.append(f"missing: {', '.join(sorted(want - have)[:6])}")
    if have - want:
        problems.append(f"not mapped: {', '.join(sorted(have - want)[:6])}")
    if problems:
        raise CheckpointError("HF checkpoint does not match the Llama-3.1 mapping: "
                              + "; ".join(problems))


# ---- tensor parallelism -------------------------------------------------------------------------
def rule_for(name: str) -> Rule:
    generic = _LAYER_RE.sub(lambda m: m.group(1) + "*.", te_spec_name(name))
    for rule in RULES:
        if rule.megatron == generic:
            return rule
    raise CheckpointError(f"{name}: not a Megatron tensor of the Llama-3.1 mapping")


def tp_shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's part of a full Megatron tensor."""
    rule = rule_for(name)
    if tp == 1 or rule.tp_dim is None:
        return full
    if rule.transform is GATE_UP:  # each rank holds [gate_r ; up_r], not a chunk of [gate ; up]
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, 0)[tp_rank], torch.chunk(up, tp, 0)[tp_rank]], 0)
    if full.shape[rule.tp_dim] % tp:
        raise CheckpointError(f"{name}: dimension {rule.tp_dim} of {list(full.shape)} is not "
                              f"divisible by TP={tp}")
    return torch.chunk(full, tp, dim=rule.tp_dim)[tp_rank]


def tp_unshard(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`tp_shard` over all TP ranks' parts (in rank order)."""
    rule = rule_for(name)
    if len(shards) == 1 or rule.tp_dim is None:
        return shards[0]
    if rule.transform is GATE_UP:
        gates, ups = zip(*(torch.chunk(s, 2, dim=0) for s in shards))
        return torch.cat(list(gates) + list(ups), dim=0)
    return torch.cat(list(shards), dim=rule.tp_dim)


def layer_offset(cfg: ModelConfig, pp_rank: int, pp: int) -> int:
    return pp_rank * (cfg.num_layers // pp)


def to_local_layer(name: str, offset: int) -> str:
    """Global layer index in ``name`` -> index within a pipeline stage (and back, offset<0)."""
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}{int(m.group(2)) - offset}.", name)


def stage_names(cfg: ModelConfig, pp_rank: int, pp: int) -> List[Tuple[str, Rule, Optional[int]]]:
    """The full-model names a pipeline stage holds (global layer indices)."""
    per = cfg.num_layers // pp
    first, last = pp_rank == 0, pp_rank == pp - 1
    out = []
    for name, rule, layer in megatron_names(cfg):
        if layer is not None:
            if pp_rank * per <= layer < (pp_rank + 1) * per:
                out.append((name, rule, layer))
        elif name.startswith("embedding.") and first:
            out.append((name, rule, layer))
        elif not name.startswith("embedding.") and last:
            out.append((name, rule, layer))
    return out


def model_params(model) -> Dict[str, torch.nn.Parameter]:
    """A built GPTModel's parameters under checkpoint (TE) names, with stage-local layer indices.
    LoRA adapters (``nemo_minitron.peft``) are not part of the base model and are left out."""
    return {te_spec_name(n): p for n, p in model.named_parameters() if not is_adapter_name(n)}


ADAPTER = "adapter"  # attribute of a LoRA adapter on a wrapped linear (peft/lora.py); not a weight


def is_adapter_name(name: str) -> bool:
    return f".{ADAPTER}.lora_" in name


def check_model_names(model, expected: Mapping[str, object]) -> None:
    have = set(model_params(model))
    want = set(expected)
    if have != want:
        raise CheckpointError(f"model parameters do not match the mapping: missing "
                              f"{sorted(want - have)[:4]}, unexpected {sorted(have - want)[:4]}")


# ---- distributed-checkpoint (stacked) keys ------------------------------------------------------
# Modules whose Transformer-Engine layers carry an ``_extra_state`` entry (FP8 metadata) in every
# layer. NeMo 24.05 restores into a TE-spec model, whose sharded state dict asks for them; Megatron's
# local spec asks for the same keys. Stored as ShardedObjects with value None (no FP8 state): what
# Megatron's local spec writes and what TE's set_extra_state accepts (it returns on None).
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                       "mlp.linear_fc1", "mlp.linear_fc2")
VOCAB_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")


def stacked_key(name: str) -> Tuple[str, Optional[int]]:
    """``decoder.layers.3.mlp.linear_fc1.weight`` -> (``decoder.layers.mlp.linear_fc1.weight``, 3).

    A distributed checkpoint stores each per-layer tensor once, stacked over layers:
    ``[num_layers, *per_layer_shape]``; non-layer tensors keep their own name and layer None.
    """
    m = _LAYER_RE.match(name)
    if m is None:
        return name, None
    return m.group(1) + name[m.end():], int(m.group(2))


def layer_name(key: str, layer: Optional[int]) -> str:
    """Inverse of :func:`stacked_key`."""
    if layer is None:
        return key
    return key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)


def megatron_shapes(cfg: ModelConfig, tp: int = 1) -> Dict[str, Tuple[int, ...]]:
    """Full (unsharded) Megatron tensor shapes by checkpoint name, vocab padded for ``tp``."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size(tp)
    per_layer = {
        "self_attention.linear_qkv.weight": (cfg.q_size + 2 * cfg.kv_size, h),
        "self_attention.linear_proj.weight": (h, cfg.q_size),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "mlp.linear_fc1.layer_norm_weight": (h,),
    }
    out = {}
    for name, _, layer in megatron_names(cfg):
        if layer is None:
            out[name] = (v, h) if name in VOCAB_NAMES else (h,)
        else:
            out[name] = per_layer[name.split(f"decoder.layers.{layer}.", 1)[1]]
    return out
