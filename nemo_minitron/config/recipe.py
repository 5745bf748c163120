"""Recipe configs: dataclasses (nested for NeMo-style sections) filled with one precedence rule.

    dataclass defaults  <  the YAML file (only what differs)  <  programmatic values (CLI flags)
                        <  ``key=value`` command-line overrides (dotted: ``trainer.max_steps=20``)

Every recipe and job uses :func:`load_config`; no other module parses configs. Unknown keys, in the
YAML or on the command line, are an error that names the dotted key; values are checked against
the field's type (ints promote to floats). An override's text is parsed as YAML
(``drop_layers=[16,17]``, ``out=null``, ``greedy=true``) except for string fields, which keep the
text as typed (``prompt=42`` is the string "42"; ``null`` still clears an optional one). Required fields (no default) must be set.

    >>> cfg = load_config(PruneConfig, "tiny", ["hidden_size=48"], kind="prune")

A config is a YAML path or the name of one shipped in the package (``nemo_minitron/conf/<kind>/``,
listed by ``nemo-minitron configs``): ``--config tiny_sft`` works from any directory, with a wheel
as with a checkout, and so do the checkout-relative paths of older docs (``conf/prune/tiny.yaml``).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, Iterable, Mapping, Optional, Type, TypeVar

from nemo_minitron.errors import ConfigError

T = TypeVar("T")

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


class _Text(str):
    """Command-line text whose type is decided by the field it lands in."""


def parse_overrides(items: Iterable[str]) -> dict:
    """``["trainer.max_steps=20", "seed=3"]`` -> ``{"trainer": {"max_steps": "20"}, "seed": "3"}``
    (leaves are unparsed command-line text)."""
    nested: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = _Text(text)
    return nested


def _unwrap_optional(hint):
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), True
    return hint, False


def _coerce(value: Any, hint, key: str):
    hint, optional = _unwrap_optional(hint)
    if isinstance(value, _Text):
        if optional and value.strip() in ("null", "~"):
            return None
        if hint is str:
            return str(value)
        import yaml

        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            value = str(value)
    if value is None:
        if optional or hint is Any:
            return None
        raise ConfigError(f"{key} must not be null")
    origin = typing.get_origin(hint)
    if origin in (list, typing.List, tuple, typing.Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        args = typing.get_args(hint)
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # from YAML: `tokenizer: 123`
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r} must be of type {hint.__name__}")
    return value


def _merge_dicts(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def build(cls: Type[T], data: Mapping, prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from nested plain ``data`` over its defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(prefix + k) for k in unknown)} for {cls.__name__} "
                          f"(known: {', '.join(fields)})")
    kwargs, missing = {}, []
    for name, f in fields.items():
        hint, _ = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, data.get(name) or {}, prefix + name + ".")
        elif name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(prefix + name)
    if missing:
        raise ConfigError(f"{cls.__name__}: required key(s) not set: {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def shipped_configs(kind: Optional[str] = None) -> Dict[str, str]:
    """``{"<kind>/<name>": path}`` of the YAML configs shipped in the package (of one kind)."""
    found = {}
    for sub in sorted(os.listdir(CONF_DIR)) if kind is None else [kind]:
        directory = os.path.join(CONF_DIR, sub)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            if name.endswith(".yaml"):
                found[f"{sub}/{name[:-len('.yaml')]}"] = os.path.join(directory, name)
    return found


def find_config(name_or_path: str, kind: Optional[str] = None) -> str:
    """The YAML file ``name_or_path`` names: an existing path, else a shipped config by name
    (``tiny_sft``; among ``kind``'s first), or by its path in a checkout (``conf/prune/tiny.yaml``)."""
    if os.path.isfile(name_or_path):  # not a directory: `--config tiny` next to a tiny/ output
        return name_or_path
    path = name_or_path.replace(os.sep, "/")
    if path.startswith("conf/") and os.path.isfile(os.path.join(CONF_DIR, path[len("conf/"):])):
        return os.path.join(CONF_DIR, path[len("conf/"):])
    name = path[:-len(".yaml")] if path.endswith(".yaml") else path
    if "/" not in name:
        for scope in ([kind] if kind else []) + [None]:
            hits = [p for key, p in shipped_configs(scope).items() if key.split("/")[1] == name]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ConfigError(f"config {name_or_path!r} is ambiguous: shipped as "
                                  f"{', '.join(k for k, p in shipped_configs().items() if p in hits)}"
                                  " (name one by its path)")
    names = ", ".join(k.split("/")[1] for k in shipped_configs(kind)) if kind else "see nemo-minitron configs"
    raise ConfigError(f"config {name_or_path}: no such file, and no shipped config of that name "
                      f"({names})")


def load_config(cls: Type[T], yaml_path: Optional[str] = None, overrides: Iterable[str] = (),
                values: Optional[Mapping] = None, kind: Optional[str] = None) -> T:
    """Build ``cls`` from its defaults, then ``yaml_path`` (a path, or the name of a shipped
    config of ``kind``: :func:`find_config`), then ``values``, then ``overrides``."""
    data: dict = {}
    if yaml_path:
        from nemo_minitron.config.nemo import load_yaml

        data = load_yaml(find_config(yaml_path, kind))
    data = _merge_dicts(data, values or {})
    data = _merge_dicts(data, parse_overrides(overrides))
    return build(cls, data)


def to_dict(cfg) -> dict:
    """The config as plain data (what a YAML file would hold)."""
    return dataclasses.asdict(cfg)


def without_none(data: Mapping) -> dict:
    """Drop None leaves (command-line flags that were not given) from a nested dict."""
    out = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            v = without_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out
