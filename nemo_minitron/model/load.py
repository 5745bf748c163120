"""Load an HF checkpoint directory straight into a built Megatron GPTModel, on any TP/PP rank.

Each rank reads only the HF tensors its own stage needs (safetensors reads lazily), maps them
through ``nemo_minitron.convert.mapping`` (the same table the converter uses) and copies its TP
shard into the parameter; at TP>1 the shard is built from the same part of each HF tensor (its
rows of q/k/v, gate/up, the vocabulary: only those pages are read), not cut from the merged one.
Strict: the checkpoint's tensor names and shapes are checked against config.json first; every
parameter of the model must be filled.

Start-up cost (bench/startup.py): a plain ``copy_`` made each weight cross memory twice (mapped
shard -> merged tensor -> parameter). At TP=1 the merged tensors (fused QKV, gate/up, padded
vocab) are concatenated straight into the parameter, and with ``assign=True`` a weight the reader
maps as it is becomes the parameter's data (no copy at all), as transformers' loading does.
"""
from __future__ import annotations

from typing import Optional

import torch

from nemo_minitron.checkpoint.hf_io import SafetensorsDir as HFReader  # noqa: F401 - re-exported
from nemo_minitron.checkpoint.hf_io import read_shapes
from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.hf import check_hf_shapes
from nemo_minitron.convert import mapping
from nemo_minitron.errors import CheckpointError


def load_hf_into_model(model, cfg: ModelConfig, hf_dir: str, reader: Optional[HFReader] = None,
                       *, assign: bool = False):
    """Fill ``model`` (this rank's part, at the TP/PP of Megatron's parallel state) from ``hf_dir``.

    ``assign=True``: a weight stored exactly as the parameter wants it (same dtype and device, a
    contiguous shard) is not copied: the parameter's data becomes the reader's private
    copy-on-write mapping of the shard's pages (file-backed, loaded on first touch). For a model
    that is only read afterwards (inference: ``ModelRunner.from_hf``). A write still works (the
    page is copied then, the file is never changed), but training keeps the default copy: its
    first optimizer step would copy every page anyway, one fault at a time."""
    from megatron.core import parallel_state as ps

    reader = reader or HFReader(hf_dir)
    check_hf_shapes(cfg, read_shapes(hf_dir, reader.weight_map))
    mapping.check_hf_names(cfg, reader.weight_map)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    offset = mapping.layer_offset(cfg, pp_rank, pp)
    names = mapping.stage_names(cfg, pp_rank, pp)
    params = mapping.model_params(model)
    expected = {mapping.to_local_layer(n, offset) for n, _, _ in names}
    mapping.check_model_names(model, expected)
    with torch.no_grad():
        for entry in names:
            name = entry[0]
            param = params[mapping.to_local_layer(name, offset)]
            if tp == 1:  # merged straight into the parameter
                [(_, shard)] = mapping.hf_to_megatron(cfg, reader, tp=1, names=[entry],
                                                      alloc=_into(param))
            else:  # this rank's rows/columns of each HF tensor, merged
                shard = _hf_tp_shard(cfg, reader, entry, tp_rank, tp)
            if tuple(shard.shape) != tuple(param.shape):
                raise CheckpointError(f"{name}: mapped shard {list(shard.shape)} does not fit the "
                                      f"model parameter {list(param.shape)} (TP={tp})")
            if shard.data_ptr() == param.data_ptr() and shard.dtype == param.dtype:
                continue  # merged straight into the parameter by alloc
            if (assign and shard.dtype == param.dtype and shard.device == param.device
                    and shard.is_contiguous()
                    and isinstance(entry[1].transform, mapping.Identity)):
                param.data = shard  # the reader's mapping itself (a row block of it at TP>1)
            else:
                param.copy_(shard.to(param.dtype))
    return model


def _hf_tp_shard(cfg: ModelConfig, reader, entry, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's part of one Megatron tensor (``mapping.tp_shard`` of the merged tensor),
    built from the same part of each HF tensor: slices of the reader's lazy mappings, so only
    the pages of this rank's rows (row-parallel) are read. Column-parallel weights are sliced
    too (every row's pages are touched then)."""
    name, rule, layer = entry
    parts = [reader(n) for n in mapping.hf_names_for(rule, layer)]
    if rule.tp_dim is None:
        return parts[0]
    if rule.transform is mapping.VOCAB:  # rows of the vocabulary padded for this TP
        rows = cfg.padded_vocab_size(tp) // tp
        start = tp_rank * rows
        real = parts[0][start:min(start + rows, cfg.vocab_size)]
        return mapping.VOCAB.merge(cfg, [real], rows)  # zero rows after the real ones
    for part in parts:
        if part.shape[rule.tp_dim] % tp:
            raise CheckpointError(f"{name}: dimension {rule.tp_dim} of {list(part.shape)} is not "
                                  f"divisible by TP={tp}")
    parts = [torch.chunk(p, tp, dim=rule.tp_dim)[tp_rank] for p in parts]
    if rule.transform is mapping.QKV_T:  # whole query groups per rank: q, k, v rows of them
        local = cfg.replace(num_attention_heads=cfg.num_attention_heads // tp,
                            num_query_groups=cfg.num_query_groups // tp)
        return mapping.QKV_T.merge(local, parts, 0)
    return rule.transform.merge(cfg, parts, 0)  # gate/up: [gate_r ; up_r]; identity: the part


def _into(param: torch.Tensor):
    """``mapping.Alloc`` that hands out ``param``'s own memory when a merged tensor of the same
    size and dtype is asked for on its device (else a new tensor): the concatenation is then the
    only pass over those bytes."""
    def alloc(shape, dtype):
        if (dtype == param.dtype and param.device.type == "cpu" and param.is_contiguous()
                and torch.Size(shape).numel() == param.numel()):
            return param.data.view(shape)
        return torch.empty(shape, dtype=dtype)
    return alloc


def load_nemo_into_model(model, cfg: ModelConfig, nemo_path: str):
    """Fill ``model`` (this rank's part, at Megatron's current TP/PP) from a .nemo file or extracted
    directory, whatever its weight layout (``nemo_minitron.model.source.ModelSource.load_into``:
    torch_dist through Megatron's ``dist_checkpointing.load``, tar members read in place)."""
    from nemo_minitron.model.source import ModelSource

    with ModelSource(nemo_path) as source:
        return source.load_into(model, cfg)
