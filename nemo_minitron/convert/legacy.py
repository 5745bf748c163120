"""NeMo's legacy weight files: ``model_weights.ckpt`` (TP=PP=1) or one per rank
(``mp_rank_XX/`` for TP>1, ``tp_rank_XX_pp_rank_XXX/`` for PP>1), each a ``torch.save``'d state dict
of that rank's GPTModel: keys ``model.<name>`` (``model.module.<name>`` when NeMo wrapped the model for
O2 mixed precision), TP-sharded tensors, and layer indices local to the pipeline stage.

Files are read with ``weights_only=True`` (no code runs on load) and memory-mapped, so a tensor is
read from disk when the converter asks for it. They must match the runtime TP/PP when loaded into a
model; the converter reassembles full tensors from any layout.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Set, Tuple

import torch

from nemo_minitron.checkpoint.fsutil import drop_mapped_pages
from nemo_minitron.checkpoint.untrusted import load_weights_only
from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.convert import mapping
from nemo_minitron.convert.nemo_file import rank_file
from nemo_minitron.errors import CheckpointError

# Entries a legacy state dict may hold that carry no weights: TE FP8 metadata, RoPE buffers.
IGNORED_SUFFIXES = ("_extra_state", "rotary_pos_emb.inv_freq")


def write_legacy(cfg: ModelConfig, get_full: Callable[[str], torch.Tensor], root: str, tp: int,
                 pp: int, dtype: torch.dtype, on_tensor=None, on_file=None) -> None:
    """Write every rank's file under ``root`` from full Megatron tensors (``get_full(name)``, vocab
    padded for ``tp``, in ``dtype``); ``on_file(path, relative path)`` takes each finished file,
    ``on_tensor(bytes, tensors)`` counts each shard made (tensors: 1 for TP rank 0's shards,
    else 0, so the counts add up to the model's tensors).

    Each file is ``torch.save`` of that rank's state dict, built tensor by tensor: memory holds
    one rank file's tensors (the whole model at TP=PP=1; tensors the mapping passes through
    unchanged stay mappings of the HF shards). At TP>1 a full tensor is made once per rank file."""
    per = cfg.num_layers // pp
    shapes = mapping.megatron_shapes(cfg, tp)
    for pp_rank in range(pp):
        names = mapping.stage_names(cfg, pp_rank, pp)
        offset = mapping.layer_offset(cfg, pp_rank, pp)
        for tp_rank in range(tp):
            state = {}
            for name, _, _ in names:
                shape = mapping.tp_shard(name, torch.empty(shapes[name], device="meta"),
                                         tp_rank, tp).shape
                shard = _shard_of(get_full, name, tp_rank, tp, shape, dtype)
                state["model." + mapping.to_local_layer(name, offset)] = shard
                if on_tensor is not None:
                    on_tensor(shard.numel() * shard.element_size(), int(tp_rank == 0))
            for local_layer in range(per):  # TE modules' FP8 state: none
                for module in mapping.EXTRA_STATE_MODULES:
                    state[f"model.decoder.layers.{local_layer}.{module}._extra_state"] = None
            path = rank_file(root, tp_rank, pp_rank, tp, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(state, path)
            del state
            if on_file is not None:  # takes the finished file (e.g. into the .nemo tar)
                on_file(path, os.path.relpath(path, root))


def _shard_of(get_full, name: str, tp_rank: int, tp: int, shape, dtype) -> torch.Tensor:
    shard = mapping.tp_shard(name, get_full(name), tp_rank, tp)
    if tuple(shard.shape) != tuple(shape) or shard.dtype != dtype:
        raise CheckpointError(f"{name}: produced {list(shard.shape)} {shard.dtype}, expected "
                              f"{list(shape)} {dtype}")
    if not shard.is_contiguous() or shard.storage_offset() \
            or shard.untyped_storage().nbytes() != shard.numel() * shard.element_size():
        shard = shard.clone()  # a view: torch.save would write its whole storage
    return shard


def _load(path: str) -> Tuple[dict, bool]:
    """(state dict, whether its tensors live in a file mapping)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file is missing")
    try:
        try:
            return load_weights_only(path, path, mmap=True), True
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # old pickle format: in memory
            return load_weights_only(path, path), False
    except CheckpointError:  # its pickle names something else: refused, nothing run
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a torch weights file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None


class LegacyReader:
    """``get(name)``: the full (TP-unsharded) tensor of a layer-indexed Megatron checkpoint name."""

    def __init__(self, root: str, cfg: ModelConfig, tp: int, pp: int):
        if cfg.num_layers % pp:
            raise CheckpointError(f"{root}: PP={pp} does not divide num_layers={cfg.num_layers}")
        self.root, self.cfg, self.tp, self.pp = root, cfg, tp, pp
        self.states: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
        self.unused: Set[Tuple[int, int, str]] = set()
        self.mapped: Set[Tuple[int, int]] = set()  # ranks whose file is mmapped
        self._last: List[torch.Tensor] = []  # the previous get()'s mmapped shards
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                state, mapped = _load(rank_file(root, tp_rank, pp_rank, tp, pp))
                if mapped:
                    self.mapped.add((tp_rank, pp_rank))
                if not isinstance(state, dict):
                    raise CheckpointError(f"{rank_file(root, tp_rank, pp_rank, tp, pp)}: not a "
                                          "state dict")
                if isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
                    state = state["state_dict"]
                plain = {}
                for key, value in state.items():
                    if key.endswith(IGNORED_SUFFIXES):
                        continue
                    for prefix in ("model.module.", "model."):
                        if key.startswith(prefix):
                            plain[mapping.te_spec_name(key[len(prefix):])] = value
                            break
                    else:
                        raise CheckpointError(f"{rank_file(root, tp_rank, pp_rank, tp, pp)}: key "
                                              f"{key!r} has neither 'model.' nor 'model.module.'")
                self.states[(tp_rank, pp_rank)] = plain
                self.unused.update((tp_rank, pp_rank, k) for k in plain)

    def get(self, name: str) -> torch.Tensor:
        _, layer = mapping.stacked_key(name)
        per = self.cfg.num_layers // self.pp
        if layer is not None:
            pp_rank = layer // per
        else:
            pp_rank = 0 if name.startswith("embedding.") else self.pp - 1
        local = mapping.to_local_layer(name, pp_rank * per)
        # the previous tensor has been written by now: drop its pages from this process (the
        # mapping stays valid), so reading a mmapped file holds one tensor's pages, not the file
        for done in self._last:
            drop_mapped_pages(done)
        self._last = []
        shards: List[torch.Tensor] = []
        for tp_rank in range(self.tp):
            state = self.states[(tp_rank, pp_rank)]
            if local not in state:
                raise CheckpointError(f"{rank_file(self.root, tp_rank, pp_rank, self.tp, self.pp)}:"
                                      f" tensor {local} is missing")
            self.unused.discard((tp_rank, pp_rank, local))
            shards.append(state[local])
            if (tp_rank, pp_rank) in self.mapped:
                self._last.append(state[local])
        return mapping.tp_unshard(name, shards)

    def check_all_used(self) -> None:
        if self.unused:
            shown = sorted(f"{rank_file(self.root, t, p, self.tp, self.pp)}:{k}"
                           for t, p, k in self.unused)
            raise CheckpointError(f"{len(shown)} tensor(s) not consumed by the mapping: "
                                  f"{', '.join(shown[:4])}")

