"""Hidden-state cosine distillation between chosen (student layer, teacher layer) pairs.

    kd:
      hidden_pairs: [[15, 15], [final, final]]   # 0-based TransformerLayer indices, or "final"
      hidden_weight: 1.0

For each pair, per counted token (``loss_mask`` = 1):  1 - cos(P(h_s), h_t), where ``h_s``, ``h_t``
are the outputs ``[s, b, hidden]`` of the student's and the teacher's TransformerLayer (the
residual stream after that layer; ``final`` is the last layer's output, i.e. the input of the final
RMSNorm) and ``P`` is a learned linear map ``student hidden -> teacher hidden`` (no bias) when the
widths differ (4B-Width: 3072 -> 4096), the identity otherwise. The hidden term is the mean over
pairs of these per-token losses, summed over the counted tokens (the training loop turns sums into
means over the global batch); the recipe adds ``hidden_weight`` times it to the logit loss.
The teacher side is detached (the teacher is frozen and runs under no_grad).

How the states are captured: forward hooks on ``model.decoder.layers[i]`` of both models keep the
layer's output of the latest forward (Megatron's TransformerLayer returns ``(hidden, context)``).
Without sequence parallelism (this project never enables it) the layer output is complete and
identical on every tensor-parallel rank -- the attention and MLP end in row-parallel linears whose
outputs are all-reduced -- so each TP rank computes the same loss, as the vocab-parallel KL does.

The projection under TP: a plain ``torch.nn.Linear`` replicated on every rank. It is created from a
seeded generator (identical on every rank), its input ``h_s`` and the loss are identical on every
TP rank, so its gradients are identical and Adam keeps the copies equal; it carries no
``tensor_model_parallel`` attribute, so Megatron's grad-norm counts it once (like the RMSNorm
weights), and Megatron DDP averages its gradient over data-parallel replicas like any parameter.
It is attached to the student GPTModel as the child module ``kd_hidden_projection`` *before* the
DDP wrap, which makes it part of the student's optimizer and of the training checkpoints (Megatron
stores a non-Megatron child as a TP/DP-replicated tensor), so a resumed run continues it.
:func:`without_projection` detaches it while the student is exported: the final HF checkpoint holds
the student's own weights only.

Limits (refused by :func:`check_hidden` with a ConfigError before any model is built):
pipeline parallelism (the loss runs on the last stage only, while the paired layers may live on
earlier ones) and full activation recomputation (Megatron then runs layer forwards without autograd
and recomputes them in backward, so a hooked output carries no gradient).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nemo_minitron.errors import ConfigError

FINAL = "final"
PROJECTION_ATTR = "kd_hidden_projection"


# ---- configuration ------------------------------------------------------------------------------
def _layer(value, n: Optional[int], where: str) -> object:
    if isinstance(value, str) and value == FINAL:
        return FINAL if n is None else n - 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}={value!r}: a layer is a 0-based integer index or {FINAL!r}")
    if value < 0 or (n is not None and value >= n):
        bound = f"0..{n - 1}" if n is not None else ">= 0"
        raise ConfigError(f"{where}={value}: layer index out of range ({bound})")
    return value


def parse_pairs(pairs: Sequence, student_layers: Optional[int] = None,
                teacher_layers: Optional[int] = None) -> List[Tuple[object, object]]:
    """``[[s, t], ...]`` -> [(s, t), ...] with ``final`` resolved when the layer counts are given.

    Checks the shape (a list of 2-element lists), the element types and, with the counts, the
    ranges; every error names ``kd.hidden_pairs[i]``."""
    if not isinstance(pairs, (list, tuple)):
        raise ConfigError(f"kd.hidden_pairs={pairs!r} must be a list of [student_layer, "
                          "teacher_layer] pairs")
    out = []
    for i, pair in enumerate(pairs):
        where = f"kd.hidden_pairs[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"{where}={pair!r} must be a pair [student_layer, teacher_layer]")
        out.append((_layer(pair[0], student_layers, where + "[0] (student)"),
                    _layer(pair[1], teacher_layers, where + "[1] (teacher)")))
    if len(set(out)) != len(out):
        raise ConfigError(f"kd.hidden_pairs={pairs!r} lists a pair twice")
    return out


def check_hidden(kd, *, student_layers: Optional[int] = None, teacher_layers: Optional[int] = None,
                 pp: int = 1, recompute: Optional[str] = None) -> None:
    """All hidden-loss errors before any model is built (shapes, ranges, layout)."""
    pairs = parse_pairs(kd.hidden_pairs, student_layers, teacher_layers)
    if not kd.hidden_weight >= 0:
        raise ConfigError(f"kd.hidden_weight={kd.hidden_weight} must be >= 0")
    if not pairs:
        return
    if pp != 1:
        raise ConfigError(f"kd.hidden_pairs with trainer.pipeline_model_parallel_size={pp}: hidden "
                          "losses need pipeline_model_parallel_size=1 (the loss runs on the last "
                          "stage, the paired layers may live on others)")
    if recompute not in (None, "", "none", "null"):
        raise ConfigError(f"kd.hidden_pairs with model.activations_checkpoint_granularity="
                          f"{recompute!r}: recomputed layers run their forward without autograd, "
                          "so their outputs cannot carry a hidden loss; set it to null")


# ---- capture ------------------------------------------------------------------------------------
class LayerOutputs:
    """Forward hooks keeping the outputs ``[s, b, hidden]`` of chosen TransformerLayers of a
    GPTModel (PP=1: local index = global index) from its latest forward."""

    def __init__(self, model, layers: Sequence[int]):
        self.outputs: Dict[int, torch.Tensor] = {}
        blocks = model.decoder.layers
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in sorted(set(layers))]

    def _hook(self, i: int):
        def keep(module, args, output):
            self.outputs[i] = output[0] if isinstance(output, (tuple, list)) else output
        return keep

    def take(self) -> Dict[int, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---- the loss -----------------------------------------------------------------------------------
def cosine_loss_sum(student_h: torch.Tensor, teacher_h: torch.Tensor,
                    loss_mask: torch.Tensor) -> torch.Tensor:
    """sum over counted tokens of 1 - cos(student_h, teacher_h), in fp32.

    ``student_h``, ``teacher_h``: ``[s, b, h]`` (Megatron's layout, same h); ``loss_mask``:
    ``[b, s]``, 1 = counted."""
    if student_h.shape != teacher_h.shape:
        raise ValueError(f"hidden states {list(student_h.shape)} (projected student) and "
                         f"{list(teacher_h.shape)} (teacher) differ in shape")
    if tuple(student_h.shape[:2]) != (loss_mask.shape[1], loss_mask.shape[0]):
        raise ValueError(f"hidden states [s, b, h] = {list(student_h.shape)} do not match the loss "
                         f"mask [b, s] = {list(loss_mask.shape)} (sequence parallelism?)")
    s, t = student_h.float(), teacher_h.detach().float()
    eps = 1e-8  # as torch's cosine_similarity: a zero vector has cosine 0, not NaN
    cos = (s * t).sum(-1) / (s.norm(dim=-1).clamp_min(eps) * t.norm(dim=-1).clamp_min(eps))
    return ((1.0 - cos) * loss_mask.t().float()).sum()


class HiddenProjection(torch.nn.Module):
    """One bias-free ``Linear(student_hidden, teacher_hidden)`` per pair when the widths differ
    (no parameters, the identity, when they are equal). Weights from a seeded generator, so every
    rank creates the same matrices: U(-1/sqrt(in), 1/sqrt(in)), torch's Linear default range."""

    def __init__(self, num_pairs: int, student_hidden: int, teacher_hidden: int,
                 dtype=torch.float32, seed: int = 1234, device=None):
        super().__init__()
        self.proj = torch.nn.ModuleList()
        if student_hidden == teacher_hidden:
            return
        g = torch.Generator().manual_seed(seed)
        bound = student_hidden ** -0.5
        for _ in range(num_pairs):
            lin = torch.nn.Linear(student_hidden, teacher_hidden, bias=False, dtype=dtype,
                                  device=device)
            with torch.no_grad():  # drawn on the CPU generator: the same on every rank and device
                w = torch.rand(teacher_hidden, student_hidden, generator=g) * 2 * bound - bound
                lin.weight.copy_(w.to(device=lin.weight.device, dtype=dtype))
            self.proj.append(lin)

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.proj[i](h) if len(self.proj) else h


class HiddenDistillation:
    """Hooks on both models, the projection attached to the student, and the loss term.

    Build it after both models exist and before the student is wrapped in DDP."""

    def __init__(self, student, teacher, kd, seed: int = 1234):
        s_layers, t_layers = len(student.decoder.layers), len(teacher.decoder.layers)
        self.pairs = parse_pairs(kd.hidden_pairs, s_layers, t_layers)
        if not self.pairs:
            raise ConfigError("kd.hidden_pairs is empty: no hidden loss to build")
        s_hidden, t_hidden = student.config.hidden_size, teacher.config.hidden_size
        param = next(student.parameters())  # the projection lives beside the student's weights
        self.projection = HiddenProjection(len(self.pairs), s_hidden, t_hidden, param.dtype, seed,
                                           device=param.device)
        if len(self.projection.proj):
            setattr(student, PROJECTION_ATTR, self.projection)
        self.student = LayerOutputs(student, [s for s, _ in self.pairs])
        self.teacher = LayerOutputs(teacher, [t for _, t in self.pairs])

    def loss_sum(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """sum over counted tokens of the mean over pairs of 1 - cos(P_i(h_s), h_t), from the
        latest forward of both models (the captures are released)."""
        hs, ht = self.student.take(), self.teacher.take()
        missing = [p for p in self.pairs if p[0] not in hs or p[1] not in ht]
        if missing:
            raise RuntimeError(f"no captured hidden states for pairs {missing}: run both models "
                               "forward first")
        total = sum(cosine_loss_sum(self.projection(i, hs[s]), ht[t], loss_mask)
                    for i, (s, t) in enumerate(self.pairs))
        return total / len(self.pairs)


@contextlib.contextmanager
def without_projection(model):
    """Detach the student's ``kd_hidden_projection`` (if any) for the duration, e.g. while its
    weights are exported; it is put back afterwards."""
    proj = model._modules.pop(PROJECTION_ATTR, None)
    try:
        yield model
    finally:
        if proj is not None:
            model._modules[PROJECTION_ATTR] = proj
