"""Rankings (top-k indices from the importance scores) and the pruned student's weights.

Pruning works on *full* tensors with HF names (the teacher is read lazily, one tensor at a time,
and the student is streamed into the writer), so it does not depend on how the importance pass was
parallelized. Kept indices are always sorted ascending: the student keeps the teacher's order, and
pruning to the teacher's own shape is the identity, bit for bit.

Which tensors touch which dimension (teacher shapes; hd = head_dim, kept):

* hidden ``H`` (one ranking for the whole model: norm-output scores summed over layers and both
  norms): columns of embed_tokens / lm_head ``[V, H]``, q/k/v_proj ``[*, H]``, gate/up_proj
  ``[F, H]``; rows of o_proj ``[H, heads*hd]``, down_proj ``[H, F]``; every RMSNorm ``[H]``.
* ffn ``F`` (per layer): rows of gate_proj and up_proj together, columns of down_proj.
* query groups and heads (per layer): a head's score is the L2 of its hd channel scores at the
  linear_proj input, a group's the L2 of its heads' scores. Whole groups are kept (rows of k/v_proj
  ``[groups*hd, H]``), then the top heads inside each kept group (rows of q_proj ``[heads*hd, H]``,
  columns of o_proj), so every kept query head still reads its own K/V head and GQA stays valid.
* layers: the dropped ones disappear, the rest are renumbered in order.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.hf import check_hf_shapes, expected_hf_shapes, write_hf_config
from nemo_minitron.errors import MinitronError
from nemo_minitron.prune.depth import choose_drop_layers, kept_layers
from nemo_minitron.prune.targets import PruneTarget


def top_k(scores: torch.Tensor, k: int) -> List[int]:
    """Indices of the k largest scores, sorted ascending (stable: ties keep the lower index)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def head_scores(attn: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """``[heads*hd]`` channel scores of one layer -> ``[heads]`` (L2 over each head's hd)."""
    return attn.view(cfg.num_attention_heads, cfg.head_dim).norm(dim=1)


def rankings(scores: dict, source: ModelConfig, target: PruneTarget, depth_metric: str = "loss"
             ) -> dict:
    """What the student keeps of the teacher, as plain data (saved as ``pruning.json``).

    ``layers``: kept teacher layers in order; ``hidden``: kept channels; per kept teacher layer
    (string keys, JSON): ``ffn`` neurons, ``query_groups`` and ``heads`` (teacher head indices).
    """
    t = target.config
    drop = list(target.drop_layers) if target.drop_layers is not None else \
        choose_drop_layers(scores, source.num_layers, t.num_layers, depth_metric)
    layers = kept_layers(source.num_layers, drop)
    hidden = top_k(scores["norm"].double().sum(dim=(0, 1)), t.hidden_size)
    hpg_src, hpg = source.heads_per_group, t.heads_per_group
    plan = {"layers": layers, "dropped_layers": sorted(drop), "hidden": hidden,
            "ffn": {}, "query_groups": {}, "heads": {}}
    for layer in layers:
        plan["ffn"][str(layer)] = top_k(scores["mlp"][layer], t.ffn_hidden_size)
        heads = head_scores(scores["attn"][layer], source)  # [heads]
        groups = top_k(heads.view(source.num_query_groups, hpg_src).norm(dim=1),
                       t.num_query_groups)
        kept_heads = []
        for g in groups:  # the best heads of each kept group, as teacher head indices
            kept_heads += [g * hpg_src + j for j in top_k(heads[g * hpg_src:(g + 1) * hpg_src], hpg)]
        plan["query_groups"][str(layer)] = groups
        plan["heads"][str(layer)] = kept_heads
    return plan


def _rows_of(blocks: List[int], size: int) -> torch.Tensor:
    """Row indices of whole ``size``-row blocks (heads or groups of head_dim rows)."""
    b = torch.tensor(blocks, dtype=torch.long)
    return (b[:, None] * size + torch.arange(size)[None, :]).flatten()


def prune_tensors(get_hf: Callable[[str], torch.Tensor], source: ModelConfig, target: ModelConfig,
                  plan: dict) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield the student's HF tensors (transformers' names and order), sliced from the teacher's
    tensors read through ``get_hf(name)``; dtypes are the teacher's."""
    hid = torch.tensor(plan["hidden"], dtype=torch.long)
    hd = source.head_dim

    def cols(t):  # [out, H] -> [out, H']
        return t.index_select(1, hid)

    def rows(t):  # [H, in] or [H] -> [H', ...]
        return t.index_select(0, hid)

    for name in expected_hf_shapes(target):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            yield name, cols(get_hf(name))
            continue
        if name == "model.norm.weight":
            yield name, rows(get_hf(name))
            continue
        _, _, j, rest = name.split(".", 3)  # model.layers.<j>.<rest>
        layer = plan["layers"][int(j)]
        src = f"model.layers.{layer}.{rest}"
        ffn = torch.tensor(plan["ffn"][str(layer)], dtype=torch.long)
        q_rows = _rows_of(plan["heads"][str(layer)], hd)  # kept heads' rows of q_proj
        kv_rows = _rows_of(plan["query_groups"][str(layer)], hd)  # kept groups' K (or V) rows
        w = get_hf(src)
        if rest.endswith("layernorm.weight"):
            out = rows(w)
        elif rest == "self_attn.q_proj.weight":
            out = cols(w.index_select(0, q_rows))
        elif rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            out = cols(w.index_select(0, kv_rows))
        elif rest == "self_attn.o_proj.weight":
            out = rows(w.index_select(1, q_rows))
        elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):  # gate and up rows together
            out = cols(w.index_select(0, ffn))
        elif rest == "mlp.down_proj.weight":
            out = rows(w.index_select(1, ffn))
        else:  # expected_hf_shapes lists nothing else
            raise MinitronError(f"{name}: no pruning rule")
        yield name, out.contiguous()


# ---- the student on disk --------------------------------------------------------------------------
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "generation_config.json")


def write_hf_student(out_dir: str, target: ModelConfig, tensors, teacher_dir: Optional[str], *,
                     extra: Optional[Dict[str, Callable[[str], None]]] = None,
                     overwrite: bool = False, max_shard_bytes: int = 5 * 10**9) -> str:
    """Write the student as an HF checkpoint directory (atomically): config.json, the sharded
    safetensors, the teacher's tokenizer/generation files, and ``extra`` files (name -> writer of
    that path). The tensors' names and shapes are checked against ``target`` before the rename."""
    from nemo_minitron.checkpoint.fsutil import atomic_output_dir
    from nemo_minitron.checkpoint.hf_io import write_safetensors_shards

    shapes = {}

    def recorded():
        for name, t in tensors:
            shapes[name] = tuple(t.shape)
            yield name, t

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_hf_config(target, tmp)
        write_safetensors_shards(recorded(), tmp, max_shard_bytes=max_shard_bytes)
        check_hf_shapes(target, shapes)
        for name in _COPIED:
            if teacher_dir and os.path.isfile(os.path.join(teacher_dir, name)):
                shutil.copy(os.path.join(teacher_dir, name), os.path.join(tmp, name))
        for name, write in (extra or {}).items():
            write(os.path.join(tmp, name))
    return os.path.abspath(out_dir)


def write_student(out: str, target: ModelConfig, tensors, teacher_dir: Optional[str], **kwargs
                  ) -> Optional[str]:
    """The student writer: an HF directory (rank 0 alone, streamed), or a ``.nemo`` written
    natively (``model.save.save_full_model``: Megatron's dist_checkpointing save, at TP=1), with
    ``extra`` files beside it (``OUT.nemo.pruning.json``, ...). The .nemo save is collective where
    a process group of several ranks exists: every rank calls, ``tensors`` None except on rank 0.
    Rank 0 holds the student in memory once for it (the HF output streams)."""
    if not out.endswith(".nemo"):
        return write_hf_student(out, target, tensors, teacher_dir, **kwargs)
    from nemo_minitron.model.save import save_full_model
    from nemo_minitron.convert import mapping

    import torch.distributed as dist

    if tensors is None and not dist.is_initialized():
        return None  # not rank 0 of a launch without a process group: nothing to save here
    full = None
    if tensors is not None:
        hf = dict(tensors)
        check_hf_shapes(target, {n: tuple(t.shape) for n, t in hf.items()})
        mapping.check_hf_names(target, hf)
        full = dict(mapping.hf_to_megatron(target, hf.pop))  # each HF tensor freed once merged
    path = save_full_model(full, target, out, base=teacher_dir,
                           overwrite=kwargs.get("overwrite", False))
    if path is not None:
        for name, write in (kwargs.get("extra") or {}).items():
            write(f"{path}.{name}")  # pruning.json, importance.pt beside the .nemo
    return path


def write_json(obj) -> Callable[[str], None]:
    def write(path):
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    return write
