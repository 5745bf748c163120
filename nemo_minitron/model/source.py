"""Where a job's model comes from: an HF directory, a ``.nemo`` file (tar) or an extracted ``.nemo``
directory, opened the same way by every job, and read natively (no temporary HF copy)::

    with ModelSource(path) as source:
        cfg = source.config            # architecture, validated; no weight read yet
        tok = source.tokenizer_dir     # a directory with tokenizer.json
        model = build_gpt_model(cfg, ...)     # at the job's TP x PP
        source.load_into(model)        # this rank's part only

What each rank reads:

- HF safetensors: the tensors of its pipeline stage, at TP>1 only its rows of the row-parallel
  ones (``model.load.load_hf_into_model``: slices of lazy safetensors mappings).
- ``.nemo`` torch_dist: Megatron's ``dist_checkpointing.load`` into
  ``model.sharded_state_dict(prefix="model.")``, as NeMo restores, at any TP/PP, each rank
  reading only the bytes of its own shards, from the tar in place (``model.dist_load``: how, and
  what is checked first in an untrusted file). Only the tar's small members
  (``model_config.yaml``, tokenizer, ``metadata.json``, ``common.pt``, ``.metadata``) go to a
  scratch directory. A torch_dist whose stored vocabulary padding differs from this TP's (128256
  rows written at TP=1, 128512 at TP=4): the layers as above, the embedding and output layer as
  below.
- ``.nemo`` zarr, legacy (any TP/PP): full tensors of the stage through the converter's readers,
  this rank's TP shard kept. A zarr or legacy tar is extracted to scratch first (as the converter
  does), after its config was read from the tar alone.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import CheckpointError

HF, NEMO = "hf", "nemo"


def source_kind(path: str) -> str:
    """``hf`` (a directory with config.json) or ``nemo`` (a .nemo file or extracted directory)."""
    from nemo_minitron.convert.io import is_nemo

    if not path:
        raise CheckpointError("no model path given")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return HF
    if is_nemo(path):
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such .nemo file or directory")
        return NEMO
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint (an HF directory or a .nemo)")
    raise CheckpointError(f"{path}: not an HF checkpoint directory (no config.json) nor a .nemo "
                          "(file, or directory with model_config.yaml)")


class ModelSource:
    """A model checkpoint opened for reading (see the module docstring). ``path`` is kept as the
    user gave it (run identities and configs name it); scratch files (a tar's small members)
    live until :meth:`close` (or the end of the ``with`` block)."""

    def __init__(self, path: str):
        self.path = path
        self.kind = source_kind(path)
        self._stack = contextlib.ExitStack()
        self._root: Optional[str] = None
        self._small: Optional[str] = None
        self._in_place: Dict[str, tuple] = {}
        self._config: Optional[ModelConfig] = None
        self._tokenizer: Optional[str] = None

    # ---- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._root = self._small = None
        if self.kind == NEMO:
            self._tokenizer = None  # it lay in the scratch just removed

    def __repr__(self) -> str:
        return f"ModelSource({self.path!r}, kind={self.kind!r})"

    @property
    def root(self) -> str:
        """The .nemo's tree: the directory itself, or a scratch directory holding the tar's
        members except its ``.distcp`` data files (read in place)."""
        if self.kind != NEMO:
            raise CheckpointError(f"{self.path}: not a .nemo")
        if self._root is None:
            from nemo_minitron.convert.nemo_file import opened_nemo

            self._root = self._stack.enter_context(opened_nemo(self.path, self._in_place))
        return self._root

    @property
    def small_root(self) -> str:
        """A tree holding the .nemo's ``model_config.yaml`` and packed tokenizer: :attr:`root`
        once it exists or where it costs nothing (a directory, torch_dist weights left in the
        tar), else (a zarr or legacy tar, whose extraction holds all the weights) only those
        members, extracted to scratch."""
        if self._root is not None or os.path.isdir(self.path):
            return self.root
        if self._small is None:
            self._small = _extract_small_members(self.path, self._stack)
            if self._small is None:  # torch_dist: the whole tree is small
                return self.root
        return self._small

    # ---- cheap: no weight read ----------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        if self._config is None:
            if self.kind == HF:
                from nemo_minitron.config.hf import read_hf_config

                self._config = read_hf_config(self.path)
            else:
                from nemo_minitron.convert.nemo_to_hf import read_config

                self._config = read_config(self.small_root, self.path)
        return self._config

    @property
    def tokenizer_dir(self) -> str:
        """The directory of the model's ``tokenizer.json`` (HF: the directory itself; .nemo:
        the packed tokenizer, else a local directory ``tokenizer.type`` names, else the family's
        Llama-3.1 tokenizer written to scratch, as nemo-to-hf does)."""
        if self._tokenizer is None:
            if self.kind == HF:  # tokenizer.json may be missing (token-id-only jobs)
                self._tokenizer = self.path
            else:
                from nemo_minitron.convert.nemo_to_hf import tokenizer_dir

                self._tokenizer = tokenizer_dir(self.small_root) or self._family_tokenizer()
        return self._tokenizer

    def _family_tokenizer(self) -> str:
        import shutil

        from nemo_minitron.checkpoint import scratch
        from nemo_minitron.tokenizer import write_tokenizer_files

        tmp = scratch.make_dir("nemo-tokenizer-")
        self._stack.callback(shutil.rmtree, tmp, True)
        write_tokenizer_files(tmp)
        return tmp

    @property
    def files_dir(self) -> str:
        """The directory an output copies the base model's tokenizer (and generation config)
        files from: the HF directory itself, or the .nemo's :attr:`tokenizer_dir`."""
        return self.path if self.kind == HF else self.tokenizer_dir

    def layout(self) -> str:
        """``hf``, ``torch_dist``, ``zarr`` or ``legacy`` (opens :attr:`root`: a zarr or legacy
        tar is extracted)."""
        if self.kind == HF:
            return HF
        from nemo_minitron.convert.nemo_file import detect_layout

        return detect_layout(self.root)[0]

    # ---- the weights --------------------------------------------------------------------------
    def load_into(self, model, cfg: Optional[ModelConfig] = None, *, assign: bool = False):
        """Fill ``model`` (this rank's part, at Megatron's current TP/PP) from the checkpoint;
        strict: every parameter is filled. ``assign``: see ``load_hf_into_model`` (HF only)."""
        cfg = cfg or self.config
        if self.kind == HF:
            from nemo_minitron.model.load import load_hf_into_model

            return load_hf_into_model(model, cfg, self.path, assign=assign)
        return _load_nemo(model, cfg, self.root, self._in_place, self.path)

    def hf_getter(self):
        """``get(hf_name)``: one HF-named tensor, read on demand in this process (no process
        group), names and shapes checked first. HF: the safetensors reader itself; .nemo: the
        stored Megatron tensor holding it, split (the parts of the last one read are kept, so
        reading in HF order reads each stored tensor once)."""
        from nemo_minitron.convert import mapping

        cfg = self.config
        if self.kind == HF:
            return self._checked_hf_reader()
        get = self._checked_stored_getter()
        owner = {hf: (name, rule, layer) for name, rule, layer in mapping.megatron_names(cfg)
                 for hf in mapping.hf_names_for(rule, layer)}
        parts: Dict[str, torch.Tensor] = {}

        def get_hf(name: str) -> torch.Tensor:
            if name not in parts:
                if name not in owner:
                    raise CheckpointError(f"{self.path}: no tensor maps to HF name {name}")
                meg, rule, layer = owner[name]
                parts.clear()
                parts.update(zip(mapping.hf_names_for(rule, layer),
                                 rule.transform.split(cfg, get(meg))))
            return parts[name]

        return get_hf

    def _checked_hf_reader(self):
        """The HF directory's safetensors reader, its names and shapes checked against the
        config."""
        from nemo_minitron.checkpoint.hf_io import read_shapes
        from nemo_minitron.config.hf import check_hf_shapes
        from nemo_minitron.convert import mapping
        from nemo_minitron.model.load import HFReader

        reader = HFReader(self.path)
        check_hf_shapes(self.config, read_shapes(self.path, reader.weight_map))
        mapping.check_hf_names(self.config, reader.weight_map)
        return reader

    def _checked_stored_getter(self):
        """``get(megatron_name)``: a full stored tensor of the .nemo, its keys checked first."""
        from nemo_minitron.convert.nemo_to_hf import (check_stored_keys, checked_getter,
                                                      weights_reader)

        _, reader = weights_reader(self.root, self.config, self._in_place)
        check_stored_keys(self.config, reader)
        return checked_getter(self.config, reader)

    def full_tensors(self) -> Dict[str, torch.Tensor]:
        """Every weight as a full Megatron tensor (checkpoint names, global layers, the vocabulary
        padded for TP=1), read in this process (no process group): for offline tools that hold
        the whole model (LoRA merge)."""
        from nemo_minitron.convert import mapping

        cfg = self.config
        if self.kind == HF:
            return dict(mapping.hf_to_megatron(cfg, self._checked_hf_reader(), tp=1))
        get = self._checked_stored_getter()
        out = {}
        for name, rule, _ in mapping.megatron_names(cfg):
            full = get(name)
            if name in mapping.VOCAB_NAMES:  # stored padding -> TP=1's
                full = rule.transform.merge(cfg, rule.transform.split(cfg, full),
                                            cfg.padded_vocab_size(1))
            out[name] = full
        return out


@contextlib.contextmanager
def opened(model):
    """``model`` (a path, or an open :class:`ModelSource`, passed through) as a source for the
    block; closed at its end only if it was opened here."""
    if isinstance(model, ModelSource):
        yield model
        return
    with ModelSource(model) as source:
        yield source


# ---- .nemo ---------------------------------------------------------------------------------------
def _extract_small_members(archive: str, stack: contextlib.ExitStack) -> Optional[str]:
    """``model_config.yaml`` and ``tokenizer/*`` of a .nemo tar whose weights are zarr or legacy
    files (at the top or under one folder), extracted alone to a scratch directory (removed by
    ``stack``) through ``nemo_file.safe_extract``'s checks, so that the config is checked before
    the weights are extracted; None for torch_dist weights (``.distcp`` members: its full tree is
    small) or an archive with neither (the full extraction then reports it)."""
    import shutil

    from nemo_minitron.checkpoint import scratch
    from nemo_minitron.convert.nemo_file import (CONFIG_NAME, TOKENIZER_DIR, content_root,
                                                 safe_extract)

    seen_distcp = []

    def small(name: str) -> bool:
        if name.endswith(".distcp"):
            seen_distcp.append(name)
        parts = name.split(os.sep)
        return any(rel == [CONFIG_NAME] or (len(rel) > 1 and rel[0] == TOKENIZER_DIR)
                   for rel in (parts, parts[1:]))

    tmp = scratch.make_dir("nemo-config-")
    stack.callback(shutil.rmtree, tmp, True)
    if not safe_extract(archive, tmp, select=small) or seen_distcp:
        return None
    try:
        return content_root(tmp)
    except CheckpointError:  # a tokenizer but no config: reading the config names what is missing
        return tmp


def _load_nemo(model, cfg: ModelConfig, root: str, in_place, label: str):
    from megatron.core import parallel_state as ps

    from nemo_minitron.convert.nemo_file import WEIGHTS_DIR
    from nemo_minitron.convert.nemo_to_hf import check_stored_keys, weights_reader

    tp = ps.get_tensor_model_parallel_world_size()
    layout, reader = weights_reader(root, cfg, in_place)  # torch_dist: check_torch_dist ran
    check_stored_keys(cfg, reader)
    stored_vocab = reader.shapes()["embedding.word_embeddings.weight"][0][0] \
        if hasattr(reader, "shapes") else None
    if layout != "torch_dist":
        return _load_full_tensors(model, cfg, reader, tp)
    from nemo_minitron.model.dist_load import check_coverage, check_tensor_records, megatron_load

    weights = os.path.join(root, WEIGHTS_DIR)
    check_coverage(reader.metadata, weights)
    check_tensor_records(weights, reader.metadata, in_place)
    if stored_vocab == cfg.padded_vocab_size(tp):
        return megatron_load(model, weights, in_place, reader.prefix, label)
    # stored with another vocabulary padding than this TP's (e.g. written at TP=1, 128256 rows,
    # loaded at TP=4: 128512): the layers as shards, the embedding and output layer re-padded
    from nemo_minitron.convert import mapping

    megatron_load(model, weights, in_place, reader.prefix, label, skip=mapping.VOCAB_NAMES)
    return _load_full_tensors(model, cfg, reader, tp, only=mapping.VOCAB_NAMES)


def _load_full_tensors(model, cfg: ModelConfig, reader, tp: int, only=None):
    """zarr, legacy (or ``only`` these names): each full tensor of this rank's stage from the
    converter's reader, its TP shard copied in (the vocabulary re-padded for this TP)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.convert import mapping
    from nemo_minitron.convert.nemo_to_hf import checked_getter

    tp_rank = ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    get = checked_getter(cfg, reader)
    offset = mapping.layer_offset(cfg, pp_rank, pp)
    names = mapping.stage_names(cfg, pp_rank, pp)
    params = mapping.model_params(model)
    mapping.check_model_names(model, {mapping.to_local_layer(n, offset) for n, _, _ in names})
    if only is not None:
        names = [entry for entry in names if entry[0] in only]
    padded = cfg.padded_vocab_size(tp)
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
