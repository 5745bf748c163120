"""Recipe configuration, with one precedence rule: dataclass defaults, then the YAML file (only what
differs), then ``key=value`` overrides from the command line. Unknown keys are errors that name the
key; values are checked against the type of the field's default.

    >>> cfg = load_config(GenerateJobConfig, "conf/generate/tiny.yaml", ["max_new_tokens=8"])
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Mapping, Optional, Type, TypeVar

from nemo_minitron.errors import ConfigError

T = TypeVar("T")


class _Raw(str):
    """Command-line text: kept as is for string fields, parsed as YAML (8, 0.7, true, [a, b])
    for the others."""


def parse_override(item: str):
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value")
    return key.strip(), _Raw(text)


def _coerce(cls_name: str, f: dataclasses.Field, value):
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if isinstance(value, _Raw):
        if isinstance(default, str):
            return str(value)
        import yaml

        try:
            value = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            value = str(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    elif isinstance(default, (list, tuple)):
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{cls_name}.{f.name}={value!r} must be of type "
                          f"{type(default).__name__}")
    return value


def load_config(cls: Type[T], yaml_path: Optional[str] = None,
                overrides: Iterable[str] = (), values: Optional[Mapping] = None) -> T:
    """Build ``cls`` from its defaults, the YAML file, then ``values`` and ``key=value`` strings."""
    import yaml

    fields = {f.name: f for f in dataclasses.fields(cls)}
    merged = {}
    if yaml_path:
        if not os.path.isfile(yaml_path):
            raise ConfigError(f"{yaml_path}: config file not found")
        try:
            with open(yaml_path) as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{yaml_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of config keys")
        merged.update(data)
    merged.update(values or {})
    merged.update(parse_override(item) for item in overrides)
    unknown = sorted(set(merged) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} "
                          f"(known: {', '.join(fields)})")
    return cls(**{k: _coerce(cls.__name__, fields[k], v) for k, v in merged.items()})
