"""Depth pruning: which layers to drop.

Two layer-importance signals, both computed by the importance pass (importance.py):

* ``layer_cosine[i]`` = mean over tokens of 1 - cosine(input of layer i, output of layer i): a layer
  that barely turns its input is cheap to remove (the "block importance" of the Minitron paper);
* ``block_loss[k][i]`` = the LM loss of the teacher with layers i..i+k-1 removed. Minitron found
  that dropping one *contiguous* block beats dropping the k individually least important layers
  (Llama-3.1-Minitron-4B-Depth drops layers 16..31).

A dropped layer is skipped in the Megatron model by a forward hook that returns the layer's input
unchanged: the residual stream goes straight to the next layer, exactly as in a model built
without it (the layer-drop reference in the tests removes the layers from a transformers model).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Sequence

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import ConfigError

DEPTH_METRICS = ("loss", "cosine")


@contextlib.contextmanager
def skip_layers(model, cfg: ModelConfig, layers: Iterable[int]):
    """Within the block, this stage's layers among ``layers`` (global indices) pass their input
    through (hidden states ``[s, b, h]``; the attention context, if any, passes as None)."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    offset = ps.get_pipeline_model_parallel_rank() * (cfg.num_layers // pp)
    local = list(model.decoder.layers)
    handles = []

    def passthrough(module, args, kwargs, output):
        hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (hidden_in,) + tuple(output[1:]) if isinstance(output, tuple) else hidden_in

    for i in layers:
        if offset <= i < offset + len(local):
            handles.append(local[i - offset].register_forward_hook(passthrough, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def choose_drop_layers(scores: dict, num_layers: int, keep: int, metric: str = "loss"
                       ) -> List[int]:
    """Teacher layers to drop so that ``keep`` of ``num_layers`` remain.

    ``loss``: the contiguous block with the lowest LM loss when dropped (first one on ties);
    ``cosine``: the ``num_layers - keep`` layers with the lowest 1 - cosine (any positions).
    """
    k = num_layers - keep
    if k == 0:
        return []
    if metric == "loss":
        table = scores.get("block_loss", {}).get(k)
        if table is None:
            raise ConfigError(f"the scores hold no LM losses for dropping {k} contiguous layers "
                              f"(have block lengths {sorted(scores.get('block_loss', {}))}); rerun "
                              "the importance pass with this num_layers, or depth_metric=cosine")
        start = int(torch.argmin(table).item())
        return list(range(start, start + k))
    if metric == "cosine":
        order = torch.sort(scores["layer_cosine"].double(), stable=True).indices
        return sorted(order[:k].tolist())
    raise ConfigError(f"depth_metric={metric!r} is not one of {', '.join(DEPTH_METRICS)}")


def kept_layers(num_layers: int, drop: Optional[Sequence[int]]) -> List[int]:
    dropped = set(drop or ())
    return [i for i in range(num_layers) if i not in dropped]
