"""Recipe configs: one dataclass per recipe, filled with the precedence written once here.

    dataclass defaults  <  the YAML file (only what differs)  <  ``key=value`` command-line overrides

Values are plain data (strings, numbers, lists). An override's value is parsed as YAML
(``num_layers=16``, ``drop_layers=[16,17]``, ``out=null``); unknown keys, in the YAML or on the
command line, are an error that names the key.

    >>> cfg = load_recipe_config(PruneConfig, "conf/prune/tiny.yaml", ["hidden_size=48"])
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Type, TypeVar

from nemo_minitron.errors import ConfigError

T = TypeVar("T")


def parse_overrides(items: Iterable[str]) -> dict:
    """``["a=1", "b=[1,2]"]`` -> ``{"a": 1, "b": [1, 2]}`` (values parsed as YAML scalars/lists)."""
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw  # e.g. a path with a colon: keep the text
        out[key] = value
    return out


def _check_keys(cls, data: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__} "
                          f"(known: {', '.join(sorted(names))})")


def load_recipe_config(cls: Type[T], yaml_path: Optional[str] = None,
                       overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` (a dataclass) from its defaults, then ``yaml_path``, then ``overrides``."""
    from nemo_minitron.config.nemo import load_yaml

    values = {}
    if yaml_path:
        data = load_yaml(yaml_path)
        _check_keys(cls, data, yaml_path)
        values.update(data)
    cli = parse_overrides(overrides)
    _check_keys(cls, cli, "command line")
    values.update(cli)
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING and f.name not in values)
    if missing:
        raise ConfigError(f"{cls.__name__}: required key(s) not set: {', '.join(missing)}")
    return cls(**values)


def dump_recipe_config(cfg) -> dict:
    """The config as plain data (what a YAML file would hold)."""
    return dataclasses.asdict(cfg)
