"""Reading the pickles inside checkpoints that may come from anyone: nothing in them ever runs.

A ``.nemo`` (or a distributed checkpoint directory) holds three kinds of pickle, and an attacker who
hands someone a file controls all of them:

- DCP's ``model_weights/.metadata`` (torch's ``FileSystemReader`` unpickles it without limits):
  read here by :func:`read_dcp_metadata`, an allow-list unpickler that knows DCP's metadata
  classes, ``torch.Size``, dtypes and layouts, and refuses anything else with a one-line
  :class:`CheckpointError` naming what the file asked for.
- ``torch.save`` files: ``common.pt``, legacy ``model_weights.ckpt`` rank files, each tensor chunk
  and each byte object (``_extra_state``) inside ``*.distcp``: read by :func:`load_weights_only`
  (``torch.load(weights_only=True)``: tensors and plain containers only). torch's own refusal text
  advises re-running with ``weights_only=False``; that advice is never passed on.
- Megatron's ``dist_checkpointing.load`` reads ``.metadata`` and the byte objects with unrestricted
  unpicklers (torch's DCP ``DefaultLoadPlanner`` calls ``torch.load(weights_only=False)``) and
  ``common.pt`` with torch.load's default (unrestricted before torch 2.6). Every path of ours
  reads a checkpoint through the readers of ``nemo_minitron.convert`` first, which run all of the
  above over every pickle Megatron will read (:func:`check_common`, ``TorchDistReader``), so a
  hostile file is refused before Megatron sees it.

There is no fallback to an unrestricted reader anywhere.
"""
from __future__ import annotations

import os
import pickle
import re

import torch

from nemo_minitron.errors import CheckpointError


class _MetadataRecord:
    """An object of a DCP ``.metadata`` as :func:`read_dcp_metadata` reads it: its pickled fields
    as attributes (the dataclasses' own pickled state), whatever torch version wrote them."""

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ fields)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{type(self).__name__} state is a "
                                         f"{type(state).__name__}, not its fields")
        self.__dict__.update(state)


class _TensorProperties(_MetadataRecord):
    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 5:  # TensorProperties.__getstate__
            self.dtype, self.layout, self.requires_grad, _, self.pin_memory = state
        else:
            super().__setstate__(state)


def _record(name: str) -> type:
    return type(name, (_MetadataRecord,), {})


_DCP = "torch.distributed.checkpoint.metadata"
_PLANNER = "torch.distributed.checkpoint.planner"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"


def _enum_value(value):
    return value  # an Enum member pickled by value: keep the value


# Everything a .metadata written by torch 2.2 - 2.13 through Megatron-Core 0.7 - 0.16 names
# (megatron-core 0.16 also keeps every rank's save plan in ``all_local_plans``). Each entry is a
# plain record (fields set, nothing called), an identity, or a lookup by name in torch.
_METADATA_CLASSES = {
    (_DCP, "TensorProperties"): _TensorProperties,
    (_DCP, "_MEM_FORMAT_ENCODING"): _enum_value,
    (_PLANNER, "WriteItemType"): _enum_value,
    ("torch.serialization", "_get_layout"): None,  # torch's own: a torch.layout by its name
    ("torch", "Size"): torch.Size,
    **{(_DCP, name): _record(name)
       for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                    "ChunkStorageMetadata", "MetadataIndex", "StorageMeta")},
    **{(_PLANNER, name): _record(name)
       for name in ("SavePlan", "WriteItem", "TensorWriteData", "BytesIOWriteData")},
    (_FILESYSTEM, "_StorageInfo"): _record("_StorageInfo"),
    (_FILESYSTEM, "_StoragePrefix"): _record("_StoragePrefix"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes a ``.metadata`` holds; also avoids importing ``torch.distributed.checkpoint``
    (its DTensor modules take 0.55 s to import)."""

    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES:
            found = _METADATA_CLASSES[module, name]
            return found if found is not None else super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {str(pid)[:60]!r}")


class _TorchMetadataUnpickler(_MetadataUnpickler):
    """The same allow-list, giving torch's own classes (objects to pickle again)."""

    def find_class(self, module, name):
        _MetadataUnpickler.find_class(self, module, name)  # refuses what is not on the list
        return pickle.Unpickler.find_class(self, module, name)


class _Refused(pickle.UnpicklingError):
    """A pickle named something outside the allow-list (the message is the name)."""


def read_dcp_metadata(weights_dir: str, torch_classes: bool = False):
    """A distributed checkpoint's ``.metadata``: ``state_dict_metadata`` (key -> ``size``,
    ``properties.dtype``, ``chunks`` of ``offsets``/``sizes``; byte objects have no ``chunks``)
    and ``storage_data`` (index with ``fqn``, ``offset`` -> ``relative_path``, ``offset``,
    ``length``). A file naming any class outside the allow-list, or unreadable, raises a one-line
    :class:`CheckpointError`; nothing it names is called. ``torch_classes``: the objects as
    torch's own DCP classes (to be pickled again), not as plain records."""
    path = os.path.join(weights_dir, ".metadata")
    unpickler = _TorchMetadataUnpickler if torch_classes else _MetadataUnpickler
    try:
        with open(path, "rb") as f:
            metadata = unpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"{path}: refused: it names {e}, which a checkpoint's metadata never "
                              "holds (nothing in it was run)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises many types
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {_first_line(e)})") from None
    fields = ("state_dict_metadata", "storage_data")
    if type(metadata).__name__ != "Metadata" or not all(
            isinstance(getattr(metadata, f, None), dict) for f in fields):
        raise CheckpointError(f"{path}: not a DCP Metadata (found {type(metadata).__name__})")
    return metadata


# torch's refusal names the global in one of these forms (torch 2.6+ / 2.3)
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|[Uu]nsupported (?:class|global:?) (?:GLOBAL )?([\w.]+)")


def load_weights_only(source, label: str, **kwargs):
    """``torch.load(source, weights_only=True)`` on the CPU (extra keyword arguments, e.g. ``mmap``,
    pass through). A file whose pickle names anything but tensors and plain data raises a
    one-line :class:`CheckpointError` naming it; other failures (truncated, not a torch file)
    raise ``RuntimeError``/``EOFError``/... unchanged, for the caller to word."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        what = (found.group(1) or found.group(2)) if found else "something other than tensors " \
                                                                  "and plain data"
        raise CheckpointError(f"{label}: refused: its pickle names {what}; only tensors and plain "
                              "data are loaded from a checkpoint (nothing in it was run)") from None


def check_common(weights_dir: str):
    """A distributed checkpoint's ``common.pt`` (Megatron reads it with torch.load's default,
    unrestricted before torch 2.6), read with :func:`load_weights_only` first; its content, or None
    when there is none."""
    path = os.path.join(weights_dir, "common.pt")
    if not os.path.exists(path):
        return None
    try:
        return load_weights_only(path, path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - zip/pickle errors of several types
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""
