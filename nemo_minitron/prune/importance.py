"""Activation importance for Minitron width pruning, from Megatron-Core forward hooks.

For every hooked activation ``a`` (Megatron is sequence-first: ``[seq, batch, channels]``) the
score of channel c is ``sqrt(sum over samples of (mean over seq of |a[:, n, c]|)^2)``: mean |a| over
the sequence, then L2 over the batch (all calibration samples), accumulated in fp32 as a sum of
squares so micro-batches and data-parallel replicas simply add up. Hooks, per layer:

* MLP neurons: the input of ``mlp.linear_fc2`` ``[s, b, ffn/TP]`` (the SwiGLU output);
* heads: the input of ``self_attention.linear_proj`` ``[s, b, heads/TP * head_dim]`` (the attention
  context, heads in order); a head's score is the L2 of its head_dim channels (see prune.py);
* embedding channels: the outputs of ``input_layernorm`` and ``pre_mlp_layernorm`` ``[s, b, hidden]``;
* layers: 1 - cosine(layer input, layer output) per token, averaged over all tokens.

The pass runs on the local (non-TE) layer spec, whose RMSNorms are modules of their own: the TE
spec fuses them into linear_qkv / linear_fc1, where their output is never materialized.

Reduction over ranks, done once at the end with one all-reduce(SUM) over the whole world: every rank
writes its sums into zero-filled full-model tensors (``[num_layers, ffn]`` etc.) at its own place --
its pipeline stage's layers, its TP slice of the ffn / head channels -- so PP and TP parts are
disjoint and summing assembles them; quantities replicated across TP (norm outputs, cosines,
losses) are written by TP rank 0 only; data-parallel replicas saw different samples, so their sums
of squares add. Every rank ends with the same full scores, whatever the layout.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, List, Optional

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import CheckpointError, ConfigError
from nemo_minitron.model.forward import stage_forward

SCORES_VERSION = 1


def _sum_sq_of_seq_mean_abs(a: torch.Tensor) -> torch.Tensor:
    """``[s, b, c]`` -> ``[c]``: sum over the batch of (mean over seq of |a|)^2, in fp32."""
    m = a.detach().float().abs().mean(dim=0)  # [b, c]
    return (m * m).sum(dim=0)


def _layer_io(args, kwargs, output):
    """(input hidden states, output hidden states) of a TransformerLayer call, ``[s, b, h]``."""
    hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    hidden_out = output[0] if isinstance(output, tuple) else output
    return hidden_in, hidden_out


class ImportanceHooks:
    """Hooks on this rank's stage that accumulate the local sums (see the module docstring)."""

    def __init__(self, model, cfg: ModelConfig):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.tp, self.tp_rank = (ps.get_tensor_model_parallel_world_size(),
                                 ps.get_tensor_model_parallel_rank())
        self.layers = list(model.decoder.layers)
        self.offset = ps.get_pipeline_model_parallel_rank() * (cfg.num_layers //
                                                              ps.get_pipeline_model_parallel_world_size())
        n = len(self.layers)
        # on the activations' device (the all-reduce needs GPU tensors under NCCL)
        self.device = d = _model_device(model)
        self.mlp = torch.zeros(n, cfg.ffn_hidden_size // self.tp, device=d)
        self.attn = torch.zeros(n, cfg.q_size // self.tp, device=d)
        self.norm = torch.zeros(n, 2, cfg.hidden_size, device=d)  # [layer, (input, pre-MLP), H]
        self.cos = torch.zeros(n, dtype=torch.float64, device=d)  # sum of (1 - cos) over tokens
        self.tokens = torch.zeros(n, dtype=torch.float64, device=d)
        self._handles = []

    def _add(self, buf: torch.Tensor, index):
        def hook(module, args, output=None):
            a = args[0] if output is None else output
            buf[index] += _sum_sq_of_seq_mean_abs(a)
        return hook

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            h = self._handles
            h.append(layer.mlp.linear_fc2.register_forward_pre_hook(self._add(self.mlp, i)))
            h.append(layer.self_attention.linear_proj.register_forward_pre_hook(
                self._add(self.attn, i)))
            h.append(layer.input_layernorm.register_forward_hook(self._add(self.norm, (i, 0))))
            h.append(layer.pre_mlp_layernorm.register_forward_hook(self._add(self.norm, (i, 1))))
            h.append(layer.register_forward_hook(self._cosine(i), with_kwargs=True))
        return self

    def _cosine(self, i):
        def hook(module, args, kwargs, output):
            x, y = _layer_io(args, kwargs, output)
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [s, b]
            self.cos[i] += (1.0 - cos).double().sum()
            self.tokens[i] += cos.numel()
        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def reduce(self) -> Dict[str, torch.Tensor]:
        """Full-model scores, identical on every rank (one world all-reduce)."""
        import torch.distributed as dist

        cfg, n, o, d = self.cfg, len(self.layers), self.offset, self.device
        mlp = torch.zeros(cfg.num_layers, cfg.ffn_hidden_size, device=d)
        attn = torch.zeros(cfg.num_layers, cfg.q_size, device=d)
        norm = torch.zeros(cfg.num_layers, 2, cfg.hidden_size, device=d)
        cos = torch.zeros(cfg.num_layers, dtype=torch.float64, device=d)
        tokens = torch.zeros(cfg.num_layers, dtype=torch.float64, device=d)
        f, q = self.mlp.shape[1], self.attn.shape[1]
        # TP ranks hold consecutive slices: ffn neurons r*f.., heads r*heads/TP.. (x head_dim)
        mlp[o:o + n, self.tp_rank * f:(self.tp_rank + 1) * f] = self.mlp
        attn[o:o + n, self.tp_rank * q:(self.tp_rank + 1) * q] = self.attn
        if self.tp_rank == 0:  # replicated across TP: counted once
            norm[o:o + n] = self.norm
            cos[o:o + n] = self.cos
            tokens[o:o + n] = self.tokens
        floats = torch.cat([mlp.flatten(), attn.flatten(), norm.flatten()])
        doubles = torch.cat([cos, tokens])
        if dist.is_initialized():
            dist.all_reduce(floats)
            dist.all_reduce(doubles)
        floats, doubles = floats.cpu(), doubles.cpu()
        mlp, attn, norm = torch.split(floats, [mlp.numel(), attn.numel(), norm.numel()])
        cos, tokens = doubles.chunk(2)
        return {
            "mlp": mlp.view(cfg.num_layers, cfg.ffn_hidden_size).sqrt(),
            "attn": attn.view(cfg.num_layers, cfg.q_size).sqrt(),
            "norm": norm.view(cfg.num_layers, 2, cfg.hidden_size).sqrt(),
            "layer_cosine": (cos / tokens).float(),
        }


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def data_parallel_shard(samples: torch.Tensor) -> torch.Tensor:
    """This data-parallel replica's samples (every dp-th, starting at its rank)."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if samples.shape[0] < dp:
        raise ConfigError(f"{samples.shape[0]} calibration samples cannot feed {dp} data-parallel "
                          "replicas")
    return samples[rank::dp]


def _micro_batches(samples: torch.Tensor, micro_batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, samples.shape[0], micro_batch_size):
        yield samples[start:start + micro_batch_size]


def lm_loss(model, samples: torch.Tensor, micro_batch_size: int,
            progress: Optional[Callable[[str], None]] = None, label: str = "") -> float:
    """Mean next-token loss over this replica's ``samples`` ``[n, seq+1]`` and all replicas."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    device = _model_device(model)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    for k, batch in enumerate(_micro_batches(samples, micro_batch_size)):
        batch = batch.to(device)
        loss = stage_forward(model, batch[:, :-1], labels=batch[:, 1:])  # [b, s] on the last stage
        if loss is not None and ps.get_tensor_model_parallel_rank() == 0:
            sums[0] += loss.double().sum()
            sums[1] += loss.numel()
        total = -(-samples.shape[0] // micro_batch_size)
        if progress and total >= 8 and (k + 1) % (total // 4) == 0 and k + 1 < total:
            progress(f"{label}: {k + 1}/{total} micro-batches")
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def compute_scores(model, cfg: ModelConfig, samples: torch.Tensor, *, micro_batch_size: int = 1,
                   block_lengths: Iterable[int] = (), progress: Callable[[str], None] = None
                   ) -> dict:
    """The full importance pass over this replica's share of ``samples`` ``[n, seq+1]``.

    Returns plain data (the scores file's content): width scores, layer cosines, the LM loss of the
    whole teacher and, for each requested block length k, ``block_loss[k][i]``: the LM loss with
    layers i..i+k-1 dropped (see depth.py).
    """
    from nemo_minitron.prune.depth import skip_layers

    say = progress or (lambda msg: None)
    mine = data_parallel_shard(samples)
    model.eval()
    with ImportanceHooks(model, cfg) as hooks:
        base = lm_loss(model, mine, micro_batch_size, say, "importance pass")
    scores = hooks.reduce()
    say(f"importance pass done: LM loss {base:.4f} over {samples.shape[0]} samples")
    block_loss = {}
    for k in block_lengths:
        losses = []
        for start in range(cfg.num_layers - k + 1):
            with skip_layers(model, cfg, range(start, start + k)):
                losses.append(lm_loss(model, mine, micro_batch_size, say,
                                      f"drop layers {start}..{start + k - 1}"))
            say(f"drop layers {start}..{start + k - 1}: LM loss {losses[-1]:.4f} "
                f"({losses[-1] - base:+.4f})")
        block_loss[int(k)] = torch.tensor(losses, dtype=torch.float64)
    scores.update(lm_loss=base, block_loss=block_loss)
    return scores


def scores_file_content(scores: dict, cfg: ModelConfig, calibration: dict) -> dict:
    """What :func:`save_scores` writes: the scores plus what they were computed from."""
    return dict(scores, version=SCORES_VERSION, source=cfg.to_dict(), calibration=dict(calibration))


def save_scores(path: str, content: dict) -> None:
    torch.save(content, path)


def load_scores(path: str, cfg: ModelConfig) -> dict:
    """Read a scores file and check that it was computed for a teacher of ``cfg``'s shape."""
    if not os.path.isfile(path):
        raise ConfigError(f"scores={path}: no such file")
    from nemo_minitron.checkpoint.untrusted import load_weights_only

    try:
        content = load_weights_only(path, f"scores={path}")
    except CheckpointError as e:  # names something else: refused, nothing run
        raise ConfigError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - pickle/zip errors of several types
        raise ConfigError(f"scores={path}: not a scores file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(content, dict) or content.get("version") != SCORES_VERSION:
        raise ConfigError(f"scores={path}: not a version-{SCORES_VERSION} scores file")
    if ModelConfig.from_dict(content["source"]).replace(dtype=cfg.dtype) != cfg:
        raise ConfigError(f"scores={path} were computed for another teacher shape "
                          f"({content['source']['num_layers']} layers, hidden "
                          f"{content['source']['hidden_size']})")
    bad = width_shape_check(content, cfg)
    if bad:
        raise ConfigError(f"scores={path}: tensors {', '.join(bad)} do not fit the teacher")
    return content


def width_shape_check(scores: dict, cfg: ModelConfig) -> List[str]:
    """Names of score tensors whose shape does not fit ``cfg`` (empty when all fit)."""
    want = {"mlp": (cfg.num_layers, cfg.ffn_hidden_size), "attn": (cfg.num_layers, cfg.q_size),
            "norm": (cfg.num_layers, 2, cfg.hidden_size), "layer_cosine": (cfg.num_layers,)}
    return [k for k, shape in want.items() if tuple(scores[k].shape) != shape]

