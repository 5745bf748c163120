"""The student's shape: a preset (``target=minitron_4b_width``) and/or explicit targets.

    >>> t = resolve_target(get_preset("llama31_8b"), "minitron_4b_width")
    >>> t.config == get_preset("minitron_4b_width")
    True

Pruning only shrinks the five prunable sizes; everything else (head_dim, vocab, RoPE, norm eps,
token ids, dtype) is the teacher's. A preset target must agree with the teacher on those, so
pruning Llama-3.1-8B to ``minitron_4b_width`` gives exactly that preset's config. All checks happen
here, before any weights are read or any forward pass runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.config.parallel import validate_parallel
from nemo_minitron.config.presets import get_preset
from nemo_minitron.errors import ConfigError

PRUNABLE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups")
# Fields a preset target may not change: pruning keeps them (dtype is the teacher's storage).
_KEPT = ("head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling",
         "norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id")


@dataclass(frozen=True)
class PruneTarget:
    config: ModelConfig  # the student's architecture, exactly what gets written
    drop_layers: Optional[Tuple[int, ...]] = None  # explicit; None: chosen by depth importance


def resolve_target(source: ModelConfig, target: Optional[str] = None,
                   overrides: Optional[Mapping[str, object]] = None, *, tp: int = 1
                   ) -> PruneTarget:
    """Validate and build the target from a preset name and/or explicit sizes (None = unset).

    ``overrides`` keys: the :data:`PRUNABLE` sizes and ``drop_layers`` (teacher layer indices).
    ``tp``: the tensor-parallel size the student must still split into.
    """
    sizes = {}
    if target is not None:
        preset = get_preset(target)
        differ = [f"{k}={getattr(preset, k)!r} (teacher {getattr(source, k)!r})"
                  for k in _KEPT if getattr(preset, k) != getattr(source, k)]
        if differ:
            raise ConfigError(f"target={target} is not a pruned shape of this teacher: pruning "
                              f"keeps {', '.join(differ)}")
        sizes = {k: getattr(preset, k) for k in PRUNABLE}
    overrides = dict(overrides or {})
    drop = overrides.pop("drop_layers", None)
    unknown = sorted(set(overrides) - set(PRUNABLE))
    if unknown:
        raise ConfigError(f"unknown pruning target(s) {', '.join(unknown)}; prunable: "
                          f"{', '.join(PRUNABLE)}, drop_layers")
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    if drop is not None:
        drop = _check_drop_layers(drop, source.num_layers)
        want = source.num_layers - len(drop)
        if sizes.get("num_layers", want) != want:
            raise ConfigError(f"num_layers={sizes['num_layers']} contradicts drop_layers "
                              f"({source.num_layers} - {len(drop)} = {want} layers)")
        sizes["num_layers"] = want
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"target {key}={value!r} must be a positive integer")
        if value > getattr(source, key):
            raise ConfigError(f"target {key}={value} is larger than the teacher's "
                              f"{getattr(source, key)}: pruning only removes")
    try:
        cfg = source.replace(**sizes)
    except ConfigError as e:
        raise ConfigError(f"target: {e}") from None
    if cfg.num_query_groups != source.num_query_groups or cfg.heads_per_group != \
            source.heads_per_group:
        # Whole query groups are dropped and whole heads inside each kept group; a query head
        # cannot move to another group (it would attend with another K/V head).
        if cfg.heads_per_group > source.heads_per_group:
            raise ConfigError(
                f"target num_attention_heads={cfg.num_attention_heads} with num_query_groups="
                f"{cfg.num_query_groups} needs {cfg.heads_per_group} heads per group, more than "
                f"the teacher's {source.heads_per_group}: heads are pruned inside their group")
    try:
        validate_parallel(cfg, tp, 1)
    except ConfigError as e:
        raise ConfigError(f"target cannot be split by TP={tp}: {e}") from None
    return PruneTarget(config=cfg, drop_layers=drop)


def _check_drop_layers(drop: Sequence, num_layers: int) -> Tuple[int, ...]:
    if isinstance(drop, (int, str)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                               for i in drop):
        raise ConfigError(f"drop_layers={drop!r} must be a list of layer indices")
    bad = [i for i in drop if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"drop_layers: {bad} out of range for {num_layers} layers")
    if len(set(drop)) != len(drop):
        raise ConfigError(f"drop_layers={list(drop)} repeats a layer")
    if len(drop) >= num_layers:
        raise ConfigError("drop_layers would drop every layer")
    return tuple(sorted(drop))
