"""Load an HF checkpoint directory straight into a built Megatron GPTModel, on any TP/PP rank.

Each rank reads only the HF tensors its own stage needs (safetensors reads lazily), maps them
through ``nemo_minitron.convert.mapping`` (the same table the converter uses), takes its TP shard
and copies it into the parameter. Strict: the checkpoint's tensor names and shapes are checked
against config.json first; every parameter of the model must be filled.

Start-up cost (bench/startup.py): a plain ``copy_`` made each weight cross memory twice (mapped
shard -> merged tensor -> parameter). At TP=1 the merged tensors (fused QKV, gate/up, padded
vocab) are concatenated straight into the parameter, and with ``assign=True`` a weight the reader
maps as it is becomes the parameter's data (no copy at all), as transformers' loading does.
"""
from __future__ import annotations

import os
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
            alloc = _into(param) if tp == 1 else None  # at TP>1 the merged tensor is the full one
            [(_, full)] = mapping.hf_to_megatron(cfg, reader, tp=tp, names=[entry], alloc=alloc)
            shard = mapping.tp_shard(name, full, tp_rank, tp)
            if tuple(shard.shape) != tuple(param.shape):
                raise CheckpointError(f"{name}: mapped shard {list(shard.shape)} does not fit the "
                                      f"model parameter {list(param.shape)} (TP={tp})")
            if shard.data_ptr() == param.data_ptr() and shard.dtype == param.dtype:
                continue  # merged straight into the parameter by alloc
            if (assign and shard.dtype == param.dtype and shard.device == param.device
                    and shard.is_contiguous() and reader.file_region(shard) is not None):
                param.data = shard  # the reader's mapping itself (a row block of it at TP>1)
            else:
                param.copy_(shard.to(param.dtype))
    return model


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
    directory, whatever its weight layout.

    torch_dist: Megatron's ``dist_checkpointing.load`` into ``model.sharded_state_dict(prefix=...)``
    (what NeMo's restore does; reshards to any TP/PP). zarr and legacy files (any TP/PP): full
    tensors from the converter's readers, this rank's TP shard copied in, like load_hf_into_model.
    """
    from megatron.core import parallel_state as ps

    from nemo_minitron.convert.nemo_file import WEIGHTS_DIR, opened_nemo
    from nemo_minitron.convert.nemo_to_hf import check_stored_keys, checked_getter, weights_reader

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    with opened_nemo(nemo_path) as root:
        layout, reader = weights_reader(root, cfg)
        check_stored_keys(cfg, reader)
        padded = cfg.padded_vocab_size(tp)
        if layout == "torch_dist" and reader.shapes()["embedding.word_embeddings.weight"][0][0] == padded:
            from megatron.core import dist_checkpointing

            sharded = model.sharded_state_dict(prefix=reader.prefix)
            loaded = dist_checkpointing.load(sharded, os.path.join(root, WEIGHTS_DIR))
            missing, unexpected = model.load_state_dict(
                {k[len(reader.prefix):]: v for k, v in loaded.items()}, strict=False)
            if missing or [k for k in unexpected if not k.endswith("_extra_state")]:
                raise CheckpointError(f"{nemo_path}: model parameters not filled: {missing[:4]}")
            return model
        get = checked_getter(cfg, reader)
        offset = mapping.layer_offset(cfg, pp_rank, pp)
        names = mapping.stage_names(cfg, pp_rank, pp)
        params = mapping.model_params(model)
        mapping.check_model_names(model, {mapping.to_local_layer(n, offset) for n, _, _ in names})
        with torch.no_grad():
            for name, rule, _ in names:
                full = get(name)
                if name in mapping.VOCAB_NAMES:  # stored padding -> this TP's padding
                    full = rule.transform.merge(cfg, rule.transform.split(cfg, full), padded)
                shard = mapping.tp_shard(name, full, tp_rank, tp)
                param = params[mapping.to_local_layer(name, offset)]
                if tuple(shard.shape) != tuple(param.shape):
                    raise CheckpointError(f"{name}: stored shard {list(shard.shape)} does not fit "
                                          f"the model parameter {list(param.shape)} (TP={tp})")
                param.copy_(shard.to(param.dtype))
    return model
