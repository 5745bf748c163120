"""Recipe configs as nested dataclasses, and the one precedence rule that fills them.

Precedence, written once (:func:`load_config`): the dataclass defaults, then the YAML file (only what
differs), then ``key=value`` overrides from the command line (``trainer.max_steps=20``). An unknown
key anywhere is an error that names the dotted key. Values are plain data (strings, numbers,
booleans), so a config dumps and round-trips cleanly (:func:`to_dict`).

Sections follow NeMo's vocabulary (``trainer``, ``model``, ``data``, ``optim``) so a NeMo user
recognises them; names inside keep NeMo's spelling where NeMo has one (``micro_batch_size``,
``global_batch_size``, ``tensor_model_parallel_size``, ``val_check_interval``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from nemo_minitron.errors import ConfigError


@dataclass
class TrainerConfig:
    max_steps: int = 100
    precision: str = "bf16"  # bf16 | fp32 (params and compute; Adam states fp32 either way)
    seed: int = 1234
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    log_every_n_steps: int = 1
    val_check_interval: int = 0  # validate every N steps (0: only at the end, if a val set exists)
    limit_val_batches: int = 0  # global batches per validation (0: the whole validation set)
    ckpt_every_n_steps: int = 0  # distributed checkpoint every N steps (0: only at the end)
    ckpt_dir: Optional[str] = None  # default: <out>.ckpt
    resume: bool = True  # continue from the latest checkpoint in ckpt_dir when there is one
    keep_last_n_ckpts: int = 2
    log_dir: Optional[str] = None  # CSV (+ TensorBoard if installed); default: <ckpt_dir>/logs
    progress_bar: bool = True  # only where stdout is a TTY


@dataclass
class ModelSection:
    restore_from_path: Optional[str] = None  # HF checkpoint directory (the base model)
    micro_batch_size: int = 1
    global_batch_size: int = 8
    activations_checkpoint_granularity: Optional[str] = None  # None | "full"
    activations_checkpoint_num_layers: int = 1  # with "full": layers per recomputed chunk


@dataclass
class DatasetConfig:
    file_path: Optional[str] = None  # JSONL with "input" and "output" fields
    max_num_samples: int = 0  # 0: all


@dataclass
class DataSection:
    train_ds: DatasetConfig = field(default_factory=DatasetConfig)
    validation_ds: DatasetConfig = field(default_factory=DatasetConfig)
    seq_length: int = 2048
    # NeMo's SFT convention: the text before {output} is the prompt (no loss), the rest the answer.
    prompt_template: str = "{input}\n\n{output}"
    truncation: bool = True  # cut the prompt (input side) from the right when a sample is too long
    packed_sequence: bool = False
    shuffle: bool = True


@dataclass
class OptimSection:
    name: str = "adam"  # AdamW-style decoupled weight decay, as Megatron's "adam"
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0: off
    warmup_steps: int = 10
    decay_steps: int = 0  # cosine decay length after warmup (0: trainer.max_steps - warmup)
    use_distributed_optimizer: bool = False


@dataclass
class FinetuneConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    out: Optional[str] = None  # final HF checkpoint directory (``.nemo``: not yet, see export.py)


# ---- precedence ---------------------------------------------------------------------------------
def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint, key: str):
    """Check a plain value against a field's type hint (ints promote to floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r} must be of type {hint.__name__}")
    return value


def merge(obj, data: dict, prefix: str = ""):
    """Set the fields of dataclass ``obj`` from nested plain ``data``; unknown keys raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    types = _field_types(type(obj))
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in types:
            raise ConfigError(f"unknown config key {dotted!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, types[key], dotted))
    return obj


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["trainer.max_steps=20", "optim.betas=[0.9,0.95]"]`` -> nested dict (YAML-typed values)."""
    import yaml

    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text != "" else None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_config(cls=FinetuneConfig, yaml_path: Optional[str] = None,
                overrides: Sequence[str] = ()):
    """Defaults of ``cls``, then ``yaml_path``, then ``key=value`` overrides."""
    import yaml

    cfg = cls()
    if yaml_path:
        try:
            with open(yaml_path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{yaml_path}: cannot read config ({e})") from None
        merge(cfg, data)
    merge(cfg, parse_overrides(overrides))
    return cfg


def prune_none(data: dict) -> dict:
    """Drop None leaves (flags that were not given) from a nested dict."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            v = prune_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
