"""What a training run was started from, recorded next to its checkpoints, and the check that a
rerun into the same checkpoint directory continues *that* run.

``<ckpt_dir>/run.json`` (written atomically by rank 0 with each checkpoint, before ``latest``)::

    {"format": "nemo-minitron run identity 1", "recipe": "finetune",
     "inputs": {"--model": {"path": "/abs/base", "fingerprint": "sha256:..."},
                "--data": {"path": "/abs/train.jsonl", "fingerprint": "sha256:..."}},
     "settings": {"peft": "none", "data.seq_length": 2048, "trainer.seed": 1234, ...}}

Inputs are compared by content (:func:`nemo_minitron.checkpoint.paths.fingerprint`: sizes plus
sampled bytes, a few MB of reads for any model size), so a moved or copied base model still
resumes and a different one with the same shape does not. ``settings`` are the config keys that
change what the run computes (data, its order and shape, the model's precision and layout, LoRA's
shape, distillation's loss); the optimizer's knobs and ``trainer.max_steps`` may change on resume.

A rerun whose identity differs from the recorded one refuses before any model is built, with one
line naming the differences and the ways out: ``trainer.resume=false`` (start over; the old
checkpoints are replaced as the new run saves) or another ``--out``. A checkpoint directory without
``run.json`` (written before it existed) resumes unchecked.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Sequence

from nemo_minitron.errors import ConfigError

IDENTITY = "run.json"
FORMAT = "nemo-minitron run identity 1"

# config keys (dotted) that change what a run computes; those a recipe lacks are skipped
SETTINGS = (
    "peft", "lora.target_modules", "lora.rank", "lora.alpha", "lora.dropout",
    "trainer.seed", "trainer.precision", "trainer.tensor_model_parallel_size",
    "trainer.pipeline_model_parallel_size", "model.global_batch_size",
    "data.format", "data.seq_length", "data.prompt_template", "data.truncation",
    "data.packed_sequence", "data.shuffle", "data.data_prefix", "data.splits_string",
    "data.val_samples", "data.train_ds.max_num_samples", "teacher.precision", "kd",
)


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, part):
            return _MISSING
        node = getattr(node, part)
    if hasattr(node, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(node)
    return node


_MISSING = object()


def _prefix_paths(data_prefix) -> List[str]:
    """The prefixes of ``data.data_prefix`` (one prefix, or [w1, p1, w2, p2, ...])."""
    if isinstance(data_prefix, str):
        return [data_prefix]
    items = list(data_prefix or [])
    return [p for p in items[1::2] if isinstance(p, str)] if len(items) > 1 else \
        [p for p in items if isinstance(p, str)]


def data_inputs(data) -> Dict[str, Optional[str]]:
    """Label -> path of the data files a recipe's ``data`` section reads (for the identity and the
    input/output overlap check)."""
    out = {"--data": data.train_ds.file_path,
           "data.validation_ds.file_path": data.validation_ds.file_path}
    if getattr(data, "data_prefix", None) is not None:
        for i, prefix in enumerate(_prefix_paths(data.data_prefix)):
            out[f"data.data_prefix[{i}].bin"] = prefix + ".bin"
            out[f"data.data_prefix[{i}].idx"] = prefix + ".idx"
    return out


def _describe(path: Optional[str]) -> dict:
    from nemo_minitron.checkpoint.paths import fingerprint

    if path and os.path.exists(path):
        return {"path": os.path.abspath(path), "fingerprint": fingerprint(path)}
    return {"path": path, "fingerprint": None}  # not a file: pydoc, unset


def run_identity(recipe: str, cfg, inputs: Mapping[str, Optional[str]],
                 settings: Sequence[str] = SETTINGS) -> dict:
    """The identity of the run ``cfg`` of ``recipe`` would start (reads a few MB per input)."""
    values = {}
    for key in settings:
        value = _get(cfg, key)
        if value is not _MISSING:
            values[key] = value
    return {"format": FORMAT, "recipe": recipe,
            "inputs": {label: _describe(path) for label, path in inputs.items() if path},
            "settings": json.loads(json.dumps(values))}  # plain JSON data, as read back


def read_identity(ckpt_dir: str) -> Optional[dict]:
    path = os.path.join(ckpt_dir, IDENTITY)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable run identity ({e}); pass trainer.resume=false to "
                          "start over") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a run identity of this version ({FORMAT!r}); pass "
                          "trainer.resume=false to start over")
    return data


def write_identity(ckpt_dir: str, identity: dict) -> None:
    """(rank 0) Atomically write ``run.json``."""
    path = os.path.join(ckpt_dir, IDENTITY)
    tmp = os.path.join(ckpt_dir, f".{IDENTITY}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(identity, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: dict, new: dict) -> List[str]:
    """What differs between two identities, as short phrases."""
    out = []
    if old.get("recipe") != new.get("recipe"):
        out.append(f"it is a {old.get('recipe')} run, not {new.get('recipe')}")
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for label in sorted(set(old_in) | set(new_in)):
        a, b = old_in.get(label), new_in.get(label)
        if a is None or b is None:
            out.append(f"{label} was {a['path'] if a else 'not given'}, now "
                       f"{b['path'] if b else 'not given'}")
        elif a.get("fingerprint") != b.get("fingerprint"):
            if a.get("path") == b.get("path"):
                out.append(f"{label} {b['path']} has changed since the run started")
            else:
                out.append(f"{label} was {a['path']}, now {b['path']} (other contents)")
    old_s, new_s = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(old_s) | set(new_s)):
        if old_s.get(key, _MISSING) != new_s.get(key, _MISSING):
            out.append(f"{key} was {_short(old_s.get(key))}, now {_short(new_s.get(key))}")
    return out


def check_resume(ckpt_dir: str, identity: dict, resume: bool = True,
                 out_label: str = "--out") -> None:
    """Refuse to resume from ``ckpt_dir`` a run whose identity differs from ``identity``."""
    from nemo_minitron.train.checkpoint import latest_checkpoint

    if not resume:
        return
    from nemo_minitron.errors import MinitronError

    try:
        latest = latest_checkpoint(ckpt_dir)
    except MinitronError as e:  # a broken pointer
        raise ConfigError(f"{e}; pass trainer.resume=false to start over") from None
    if latest is None:
        return
    old = read_identity(ckpt_dir)
    if old is None:
        return  # written before run.json existed: nothing to compare
    diff = differences(old, identity)
    if diff:
        raise ConfigError(f"{latest} would resume another run ({'; '.join(diff)}): rerun with "
                          f"the same inputs to continue it, pass trainer.resume=false to start "
                          f"over, or choose another {out_label}")
