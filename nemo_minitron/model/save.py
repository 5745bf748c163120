"""How every job writes its model: a ``.nemo`` saved natively by all ranks, or an HF directory
streamed to rank 0 one tensor at a time. No converter process, no whole model on one rank.

    save_model(model, cfg, "out.nemo", base=BASE)                  # collective: every rank calls
    save_model(model, cfg, "out_dir", base=BASE, nemo_dir=True)    # an extracted .nemo directory
    save_model(model, cfg, "hf_out", base=BASE)                    # an HF checkpoint directory
    save_full_model(tensors, cfg, "out.nemo", base=BASE)           # full tensors held by rank 0

``.nemo`` (a path ending in ``.nemo``; or any path with ``nemo_dir=True``, which leaves the same
tree extracted, as NeMo's ``restore_from`` also accepts): every rank saves its part through
Megatron's ``dist_checkpointing.save`` (torch_dist, as the training checkpoints are) of
``model.sharded_state_dict(prefix="model.")`` with every tensor cast to the config's dtype (the
output dtype: bf16 even for an fp32 run). The local spec's sharded dict already stores its norms
under the Transformer-Engine names and asks for the per-layer ``_extra_state`` objects of
linear_qkv/proj/fc1/fc2 (value None), the same keys the converter writes, so NeMo 24.05's TE-spec
model restores it. The save goes into an owner-named staging directory next to the output
(``.OUT.save-<host>-<pid>-...``, named by rank 0 and broadcast; ``checkpoint/scratch.py``); rank 0
then makes the DCP ``.metadata`` readable by torch 2.3 (``dist_ckpt.make_torch23_readable``), and
the tree holds ``model_config.yaml`` and the base model's tokenizer; it is packed into the tar
(``nemo_file.pack_nemo``: a temporary ``.OUT.tmp-...`` renamed into place) or, with
``nemo_dir``, renamed into place itself. A killed save leaves only those owner-named entries, which
the next save in that directory removes (``scratch.sweep``). Memory: each rank's own part, plus a
copy of it in the output dtype where that differs (half its size for an fp32 run saved as bf16).
:func:`save_full_model` (a pruned student, an offline LoRA merge) saves full tensors held by rank 0
the same way (the other ranks of a process group contribute nothing but take part).

Vocabulary padding: the .nemo holds the embedding and output layer as the saving model holds them,
padded for the TP it ran at (``make_vocab_size_divisible_by * TP``), and its model_config.yaml
records that TP/PP, so NeMo restores it with the same padding by default. nemo-minitron's readers
take any padding (a model load -- ``model.source`` -- reads full tensors and re-pads where it
differs from the loading model's; ``nemo-to-hf`` slices to the vocabulary);
tests/test_native_save.py reads a TP=2 save whose padding differs from TP=1's.

HF directory: for each tensor in HF order the owning pipeline stage all-gathers its TP shards
(``mapping.tp_unshard``), the stage's first rank sends the full tensor to global rank 0, which maps
it to HF names (``mapping.megatron_to_hf``, vocab padding sliced off) and writes it into the
safetensors shards at once (``hf_io.write_safetensors_streaming``: headers known up front), then
config.json and the base model's tokenizer files. Rank 0 holds about one full tensor at a time.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.convert import mapping
from nemo_minitron.errors import CheckpointError, MinitronError

# local param name (checkpoint names, stage-local layers), its tensor -> the tensor to save
Adjust = Callable[[str, torch.Tensor], torch.Tensor]


def is_nemo_output(out: str, nemo_dir: bool = False) -> bool:
    return nemo_dir or out.endswith(".nemo")


# ---- the base model's tokenizer ------------------------------------------------------------------
def _nemo_tree(source) -> str:
    """The tree of a .nemo opened as every job opens it (``model.source.ModelSource``: only the
    small members are extracted, the weights are never read), its model_config.yaml checked."""
    from nemo_minitron.convert.nemo_file import CONFIG_NAME

    root = source.small_root
    if not os.path.isfile(os.path.join(root, CONFIG_NAME)):
        raise CheckpointError(f"{source.path}: no {CONFIG_NAME}")
    return root


def stage_tokenizer(base: Optional[str], staging: str) -> dict:
    """The base model's tokenizer into ``staging/tokenizer/`` of a .nemo tree; return the
    model_config ``tokenizer`` section. ``base``: an HF directory (its tokenizer files, packed as
    the converter packs them; tokenizer.json required), a .nemo (its section and packed files), or
    None (the family's default hub id, no files)."""
    from nemo_minitron.config.nemo import DEFAULT_TOKENIZER, load_yaml
    from nemo_minitron.convert.hf_to_nemo import _tokenizer_section
    from nemo_minitron.convert.io import is_nemo
    from nemo_minitron.convert.nemo_file import CONFIG_NAME
    from nemo_minitron.model.source import ModelSource

    if base is None:
        return dict(DEFAULT_TOKENIZER)
    if not is_nemo(base):
        return _tokenizer_section(base, None, staging)
    with ModelSource(base) as source:
        root = _nemo_tree(source)
        section = load_yaml(os.path.join(root, CONFIG_NAME)).get("tokenizer") \
            or dict(DEFAULT_TOKENIZER)
        if os.path.isdir(os.path.join(root, "tokenizer")):
            shutil.copytree(os.path.join(root, "tokenizer"), os.path.join(staging, "tokenizer"))
    return dict(section)


def copy_hf_tokenizer(base: Optional[str], out_dir: str) -> None:
    """The base model's tokenizer files into an HF output: an HF base's files as they are, a
    .nemo's packed ones (the family's Llama-3.1 tokenizer where a NeMo-written .nemo has none)."""
    from nemo_minitron.convert.io import is_nemo
    from nemo_minitron.model.source import ModelSource

    if base is None:
        return
    if not is_nemo(base):
        from nemo_minitron.convert.hf_to_nemo import TOKENIZER_FILES  # what the released repos ship

        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(base, name)):
                shutil.copyfile(os.path.join(base, name), os.path.join(out_dir, name))
        return
    from nemo_minitron.convert.nemo_to_hf import copy_tokenizer_files

    with ModelSource(base) as source:
        packed = os.path.join(_nemo_tree(source), "tokenizer")
        copy_tokenizer_files(packed if os.path.isfile(os.path.join(packed, "tokenizer.json"))
                             else None, out_dir)


# ---- .nemo ---------------------------------------------------------------------------------------
def _world() -> Tuple[bool, bool]:
    """(a process group exists, this is global rank 0)."""
    multi = dist.is_initialized()
    return multi, (not multi or dist.get_rank() == 0)


def _agree(rank0_value, multi: bool):
    """Rank 0's value on every rank (a broadcast; the value itself where there is no group)."""
    if not multi:
        return rank0_value
    box = [rank0_value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(work: Callable[[], object], out: str, then: Callable[[], None] = lambda: None):
    """Collective where a process group exists: ``work()`` on global rank 0, ``then()`` on every
    rank, and rank 0's result (None if it failed) on every rank. An error in ``work`` reaches every
    rank: rank 0 raises it, the others a :class:`MinitronError` naming it."""
    multi, rank0 = _world()
    value, error = None, None
    if rank0:
        try:
            value = work()
        except Exception as e:  # noqa: BLE001 - every rank must learn it, then rank 0 raises
            error = e
    then()
    value, message = _agree((value, None if error is None else str(error)), multi)
    if error is not None:
        raise error
    if message is not None:
        raise MinitronError(f"writing {out} failed on rank 0: {message}")
    return value


def write_nemo(out: str, cfg: ModelConfig, save_weights: Callable[[str], None], *,
               base: Optional[str] = None, overwrite: bool = False, nemo_dir: bool = False,
               tp: int = 1, pp: int = 1) -> Optional[str]:
    """Collective where a process group exists. ``save_weights(weights_dir)``, called on every
    rank, fills ``model_weights/`` (a dist_checkpointing save); everything else is rank 0's:
    staging (tokenizer and config first, so a bad base fails before the save), the torch 2.3
    metadata fix, packing or renaming into place. Returns the path on rank 0. See the module
    docstring for the names a killed save leaves."""
    from nemo_minitron.checkpoint import scratch
    from nemo_minitron.checkpoint.fsutil import atomic_output_dir
    from nemo_minitron.config.nemo import dump_yaml, to_nemo_dict
    from nemo_minitron.convert.nemo_file import CONFIG_NAME, WEIGHTS_DIR, pack_nemo

    from nemo_minitron.convert.dist_ckpt import make_torch23_readable

    out = os.path.abspath(out)
    with contextlib.ExitStack() as stack:

        def stage() -> str:
            if os.path.lexists(out) and not overwrite:
                raise MinitronError(f"{out} exists; pass --overwrite to replace it")
            parent = os.path.dirname(out)
            os.makedirs(parent, exist_ok=True)
            if nemo_dir:  # the staging directory is the output, renamed into place on success
                staging = stack.enter_context(atomic_output_dir(out, overwrite=overwrite))
            else:
                staging = scratch.make_dir(".save-", parent, stem="." + os.path.basename(out))
                stack.callback(shutil.rmtree, staging, ignore_errors=True)
            tokenizer = stage_tokenizer(base, staging)
            with open(os.path.join(staging, CONFIG_NAME), "w") as f:
                f.write(dump_yaml(to_nemo_dict(cfg, tp=tp, pp=pp, tokenizer=tokenizer,
                                               dist_ckpt_format="torch_dist")))
            os.makedirs(os.path.join(staging, WEIGHTS_DIR))
            return staging

        staging = _on_rank0(stage, out)  # named by rank 0, known to all
        weights = os.path.join(staging, WEIGHTS_DIR)
        save_weights(weights)

        def finish() -> None:
            make_torch23_readable(weights)
            if not nemo_dir:
                pack_nemo(staging, out, overwrite=overwrite)

        _on_rank0(finish, out)
    return out if _world()[1] else None


def _torch_dist_save(sharded: dict, weights_dir: str) -> None:
    from nemo_minitron.compat import cpu

    # Megatron's writer calls torch.cuda.synchronize(): on a machine without CUDA the CPU shim,
    # for this save only where nothing (a job) had it active already
    with cpu.active():
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        # torch_dist whatever the stack's default (megatron-core 0.7 may default to zarr)
        dist_checkpointing.save(sharded, weights_dir,
                                sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1))


def output_sharded_state(model, dtype: torch.dtype, adjust: Optional[Adjust] = None) -> dict:
    """``model.sharded_state_dict(prefix="model.")`` without LoRA adapters, every tensor (plain or
    behind Megatron's SwiGLU factory) ``adjust``-ed and cast to ``dtype`` (a new tensor where it
    changes: the parameters are never modified)."""
    from nemo_minitron.convert.mapping import is_adapter_name

    out = {}
    for key, item in model.sharded_state_dict(prefix="model.").items():
        name = key[len("model."):]
        if is_adapter_name(name):
            continue
        data = getattr(item, "data", None)
        if isinstance(data, torch.Tensor):
            data = data.detach()
            if adjust is not None:
                data = adjust(mapping.te_spec_name(name), data)
            item.data = data.to(dtype)
            if hasattr(item, "dtype"):  # a ShardedTensor records it; a factory builds from data
                item.dtype = dtype
        out[key] = item
    return out


# ---- HF: streamed to rank 0 ----------------------------------------------------------------------
def _owner_stage(cfg: ModelConfig, name: str, pp: int) -> int:
    _, layer = mapping.stacked_key(name)
    if layer is not None:
        return layer // (cfg.num_layers // pp)
    return 0 if name.startswith("embedding.") else pp - 1


class _Fetcher:
    """``fetch(name)``, called by every rank for every full-model name in the same order: the full
    tensor on global rank 0 (None elsewhere). The owning stage's data-parallel replica 0 all-gathers
    the TP shards; its TP rank 0 sends the result to rank 0 (point to point)."""

    def __init__(self, model, cfg: ModelConfig, dtype: torch.dtype, adjust: Optional[Adjust]):
        from megatron.core import parallel_state as ps

        self.cfg, self.dtype, self.adjust = cfg, dtype, adjust
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp, self.pp_rank = (ps.get_pipeline_model_parallel_world_size(),
                                 ps.get_pipeline_model_parallel_rank())
        self.offset = mapping.layer_offset(cfg, self.pp_rank, self.pp)
        self.params = mapping.model_params(model)
        self.replica0 = ps.get_data_parallel_rank() == 0
        self.tp_rank, self.tp_group = (ps.get_tensor_model_parallel_rank(),
                                       ps.get_tensor_model_parallel_group())
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.shapes = mapping.megatron_shapes(cfg, self.tp)
        self.device = next(iter(self.params.values())).device
        # rank 0's pipeline group: the (tp 0, dp 0) rank of every stage, in stage order
        self.stage_ranks = (dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
                            if dist.is_initialized() else [0])

    def __call__(self, name: str) -> Optional[torch.Tensor]:
        owner = _owner_stage(self.cfg, name, self.pp)
        full = None
        if owner == self.pp_rank and self.replica0:
            local_name = mapping.to_local_layer(name, self.offset)
            local = self.params[local_name].detach()
            if self.adjust is not None:
                local = self.adjust(local_name, local)
            local = local.to(self.dtype)
            if self.tp > 1 and mapping.rule_for(name).tp_dim is not None:
                shards = [torch.empty_like(local) for _ in range(self.tp)]
                dist.all_gather(shards, local.contiguous(), group=self.tp_group)
                local = mapping.tp_unshard(name, shards)
                del shards
            if self.tp_rank == 0:
                if self.rank == 0:
                    full = local
                else:
                    dist.send(local.contiguous(), dst=0)
            del local
        elif self.rank == 0:
            full = torch.empty(self.shapes[name], dtype=self.dtype, device=self.device)
            dist.recv(full, src=self.stage_ranks[owner])
        if full is None:
            return None
        if tuple(full.shape) != tuple(self.shapes[name]):
            raise CheckpointError(f"{name}: gathered {list(full.shape)}, expected "
                                  f"{list(self.shapes[name])}")
        return full.cpu()


def write_hf(out: str, cfg: ModelConfig, tensors: Iterable[Tuple[str, torch.Tensor]], *,
             base: Optional[str] = None, overwrite: bool = False) -> str:
    """(one process) HF directory from ``(HF name, tensor)`` in HF order, written as they come
    (any dtype: cast to the config's), plus config.json and the base model's tokenizer files;
    atomic (``fsutil.atomic_output_dir``)."""
    from nemo_minitron.checkpoint.fsutil import atomic_output_dir
    from nemo_minitron.checkpoint.hf_io import write_safetensors_streaming
    from nemo_minitron.config.hf import expected_hf_shapes, write_hf_config
    from nemo_minitron.config.megatron import torch_dtype

    store = torch_dtype(cfg.dtype)
    specs = [(n, s, store) for n, s in expected_hf_shapes(cfg).items()]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_safetensors_streaming(specs, ((n, t.to(store)) for n, t in tensors), tmp)
        write_hf_config(cfg, tmp)
        copy_hf_tokenizer(base, tmp)
    return os.path.abspath(out)


def stream_model_tensors(model, cfg: ModelConfig, dtype: torch.dtype,
                         adjust: Optional[Adjust] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Collective generator (every rank iterates it to the end): ``(HF name, tensor)`` of the whole
    model in HF order on global rank 0, nothing elsewhere; one full tensor fetched at a time."""
    fetch = _Fetcher(model, cfg, dtype, adjust)
    if fetch.rank == 0:
        yield from mapping.megatron_to_hf(cfg, fetch)
    else:
        for name, _, _ in mapping.megatron_names(cfg):
            fetch(name)


# ---- the two entry points ------------------------------------------------------------------------
def save_model(model, cfg: ModelConfig, out: str, *, base: Optional[str] = None,
               overwrite: bool = False, nemo_dir: bool = False,
               adjust: Optional[Adjust] = None) -> Optional[str]:
    """Collective: every rank calls it with its part of the model (an unwrapped GPTModel at
    Megatron's current TP/PP/DP). Writes ``out`` in the config's dtype: a .nemo (path ending in
    ``.nemo``, or an extracted .nemo directory with ``nemo_dir=True``) or an HF directory.
    ``base``: the model the job started from (HF dir or .nemo), whose tokenizer the output gets.
    ``adjust(name, local tensor)``: applied to every local weight before it is written (e.g. a
    LoRA merge). Returns the path on rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.config.megatron import torch_dtype

    store = torch_dtype(cfg.dtype)
    if is_nemo_output(out, nemo_dir):
        return write_nemo(out, cfg,
                          lambda d: _torch_dist_save(output_sharded_state(model, store, adjust), d),
                          base=base, overwrite=overwrite, nemo_dir=nemo_dir,
                          tp=ps.get_tensor_model_parallel_world_size(),
                          pp=ps.get_pipeline_model_parallel_world_size())
    tensors = stream_model_tensors(model, cfg, store, adjust)

    def drain() -> None:  # other ranks: their part of every fetch (rank 0: the rest, on error)
        for _ in tensors:
            pass
    path = _on_rank0(lambda: write_hf(out, cfg, tensors, base=base, overwrite=overwrite), out,
                     then=drain)
    return path if _world()[1] else None


def save_full_model(tensors: Optional[Dict[str, torch.Tensor]], cfg: ModelConfig, out: str, *,
                    base: Optional[str] = None, overwrite: bool = False,
                    nemo_dir: bool = False) -> Optional[str]:
    """The whole model as full Megatron tensors (checkpoint names, global layers) held by one
    process: ``tensors`` on global rank 0, None on the other ranks of a process group (which must
    call too for a .nemo: the save is collective). Same outputs as :func:`save_model`, at TP=1.
    Without a process group the .nemo's save runs in a one-rank world set up here
    (``dist.one_rank_world``)."""
    from nemo_minitron.config.megatron import torch_dtype
    from nemo_minitron.convert.dist_ckpt import sharded_full_model

    store = torch_dtype(cfg.dtype)
    multi, rank0 = _world()
    if not is_nemo_output(out, nemo_dir):
        if not rank0:
            return None
        get = lambda name: tensors[name]  # noqa: E731
        return write_hf(out, cfg, mapping.megatron_to_hf(cfg, get), base=base, overwrite=overwrite)

    def save(weights_dir: str) -> None:
        sharded = {}
        if rank0:
            sharded = sharded_full_model(cfg, [(n, tensors[n].to(store))
                                               for n, _, _ in mapping.megatron_names(cfg)])
        if multi:
            _torch_dist_save(sharded, weights_dir)
            return
        from nemo_minitron.dist import one_rank_world

        with one_rank_world():
            _torch_dist_save(sharded, weights_dir)

    return write_nemo(out, cfg, save, base=base, overwrite=overwrite, nemo_dir=nemo_dir)


def collect_on_rank0(stage: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    """Collective. Each pipeline stage's dict (already TP-gathered; DP/TP replicas send nothing)
    merged on global rank 0; None elsewhere. For small state only (adapters): it all travels at
    once."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0 or ps.get_tensor_model_parallel_rank() != 0:
        stage = None  # replicas: one copy per stage is enough
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stage
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(stage, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    full: Dict[str, torch.Tensor] = {}
    for part in gathered:
        full.update(part or {})
    return full
