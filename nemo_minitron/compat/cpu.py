"""Run Megatron-Core on a machine without CUDA (CPU tests, the CPU demo).

Megatron-Core hard-codes CUDA in hundreds of places (``torch.cuda.current_device()``,
``device="cuda"``, CUDA RNG states, streams, ``torch.cuda.synchronize()``) that no config flag avoids.
Rather than patching call sites one by one, :func:`activate` gives every ``megatron.*`` module its own
view of ``torch`` in which CUDA devices mean the CPU:

* tensor factories called with ``device="cuda"`` (or a device index) allocate on the CPU;
* ``torch.cuda`` answers ``current_device()`` with the CPU, keeps RNG state in the CPU generator,
  and turns streams, events, NVTX ranges and synchronisation into no-ops;
* ``Tensor.cuda()`` returns the tensor itself.

Plus four fixes that are not about device names: gradient clipping asserts CUDA tensor types,
the mixed-precision and distributed optimizers accept only CUDA parameter type names,
``dist_checkpointing``'s writer uses a *spawn* manager that re-imports ``__main__`` on every first
save (seconds per save; a fork manager is used instead), and config validation rejects fusions that
need Transformer Engine.

What changes outside Megatron's own modules while the shim is active, process-wide:

* ``torch.Tensor.cuda`` returns the tensor itself for every caller (a CPU build of torch raises
  otherwise), not only for Megatron;
* an import hook first in ``sys.meta_path`` retargets each ``megatron.*`` module as it is imported;
* functions and methods replaced in megatron-core: ``tensor_parallel.random``'s CUDA RNG state
  helpers, ``clip_grad_by_total_norm_fp32``, the ``__init__`` of ``Float16OptimizerWithFloat16Params``
  and ``DistributedOptimizer`` (``Tensor.type`` answers with CUDA type names only while they run),
  ``TransformerConfig.__post_init__`` (fusions off, ``use_cpu_initialization=True``) and
  ``filesystem_async``'s results-queue factory.

HF transformers, user code and tests otherwise keep the real ``torch``. :func:`deactivate` undoes
all of it (modules imported while active get the real ``torch`` back), and :func:`active` scopes it::

    with cpu.active():
        ...  # Megatron on the CPU

Jobs activate it once for the life of the process (``nemo_minitron.dist.init_megatron``). Active
only when CUDA is absent; :func:`activate` is a no-op on a GPU machine. Tested on megatron-core
0.7.0, 0.16.1 and 0.19.2.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import sys
import types

import torch

_CPU = torch.device("cpu")
_FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "randperm",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "linspace", "eye",
    "empty_strided",
})
_state = {"active": False, "prefixes": ("megatron.",)}
_undo = []  # (label, restore) of every global change, replayed in reverse by deactivate()
SKIPPED = {}  # fixes whose target module does not import here -> the ImportError


def _names_cuda(device) -> bool:
    if device is None or isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def _on_cpu(factory):
    @functools.wraps(factory)
    def call(*args, **kwargs):
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return call


class _NoOp:
    """Stands in for CUDA streams, events and NVTX: every method does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as Megatron sees it on a CPU machine."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: _CPU
        self.device_count = lambda: 0
        self.synchronize = lambda *a, **k: None
        self.empty_cache = lambda *a, **k: None
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.manual_seed_all = lambda seed: torch.manual_seed(seed)
        self.Stream = _NoOp
        self.Event = _NoOp
        self.nvtx = _NoOp()
        self.current_stream = lambda *a, **k: _NoOp()
        self.default_stream = lambda *a, **k: _NoOp()
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.memory_allocated = lambda *a, **k: 0
        self.max_memory_allocated = lambda *a, **k: 0
        self.reset_peak_memory_stats = lambda *a, **k: None
        self.random = types.SimpleNamespace(get_rng_state=lambda *a, **k: torch.get_rng_state())
        for name in ("FloatTensor", "LongTensor", "IntTensor", "BoolTensor", "ByteTensor",
                     "HalfTensor", "BFloat16Tensor", "DoubleTensor"):  # legacy typed constructors
            setattr(self, name, getattr(torch, name))

    def __getattr__(self, name):  # anything else: the real module (e.g. is_available -> False)
        return getattr(torch.cuda, name)


class _TorchForMegatron(types.ModuleType):
    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        self.__file__ = torch.__file__

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            attr = _on_cpu(attr)
            setattr(self, name, attr)
        return attr


_TORCH = _TorchForMegatron()


def _retarget(module) -> None:
    name = getattr(module, "__name__", "") or ""
    namespace = getattr(module, "__dict__", None)
    if _state["active"] and (name + ".").startswith(_state["prefixes"]) and namespace is not None \
            and namespace.get("torch") is torch:
        namespace["torch"] = _TORCH


def _replace(owner, name: str, value) -> None:
    """``owner.name = value``, undone by :func:`deactivate` (once per attribute)."""
    original = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else \
        getattr(owner, name, _MISSING)
    if not any(o is owner and n == name for o, n, _ in _undo):
        _undo.append((owner, name, original))
    setattr(owner, name, value)


_MISSING = object()


class _RetargetOnImport(importlib.abc.MetaPathFinder):
    """Retarget megatron modules imported after :func:`activate`, right after they execute."""

    def find_spec(self, fullname, path, target=None):
        if not (fullname + ".").startswith(_state["prefixes"]):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            loader = spec.loader
            if loader is not None and hasattr(loader, "exec_module"):
                original = loader.exec_module

                def exec_module(module, _original=original):
                    _original(module)
                    _retarget(module)

                loader.exec_module = exec_module
            return spec
        return None


def _fix_rng_helpers():
    from megatron.core.tensor_parallel import random as mrandom

    _replace(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    if hasattr(mrandom, "_get_cuda_rng_state"):
        _replace(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())


def _fix_grad_clipping():
    """``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``."""
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = []
        for p in parameters:
            g = getattr(p, attr, None)
            if g is not None:
                grads.append((g.to_local() if hasattr(g, "to_local") else g).detach())
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0 and grads:
            torch._foreach_mul_(grads, coeff)

    _replace(clip_grads, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        _replace(optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                    "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _cuda_type_names():
    """``Tensor.type()`` answers with the CUDA type names while Megatron sorts its parameters."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        return name if args or kwargs else _CUDA_TYPE_NAMES.get(name, name)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _fix_param_type_checks():
    """Megatron's mixed-precision and distributed optimizers sort parameters by
    ``param.type() in ['torch.cuda.HalfTensor', ...]`` and raise TypeError for anything else."""
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        init = cls.__init__
        if getattr(init, "_nemo_minitron_cpu", False):
            continue

        def __init__(self, *args, _init=init, **kwargs):
            with _cuda_type_names():
                _init(self, *args, **kwargs)

        __init__._nemo_minitron_cpu = True
        _replace(cls, "__init__", __init__)


def _fix_checkpoint_queue():
    """A fork manager for dist_checkpointing's write results (spawn re-imports __main__), which
    dies with this process (nemo_minitron/lifecycle.py)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from nemo_minitron import lifecycle

    name = lifecycle.writer_queue_factory_name(fa)
    if name is not None:  # recorded for deactivate(), then replaced
        _replace(fa, name, getattr(fa, name))
    lifecycle.tie_megatron_writer_queue("fork")


_NEEDS_TE_OR_CUDA = ("apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion",
                     "bias_dropout_fusion", "gradient_accumulation_fusion", "persist_layer_norm",
                     "cross_entropy_loss_fusion")


def _fix_config_defaults():
    from megatron.core.transformer.transformer_config import TransformerConfig

    original = TransformerConfig.__post_init__
    if getattr(original, "_nemo_minitron_cpu", False):
        return

    def __post_init__(self):
        for name in _NEEDS_TE_OR_CUDA:
            if getattr(self, name, False):
                setattr(self, name, False)
        self.use_cpu_initialization = True
        original(self)

    __post_init__._nemo_minitron_cpu = True
    _replace(TransformerConfig, "__post_init__", __post_init__)


def extend_to(package: str) -> None:
    """Give ``package``'s modules (e.g. ``nemo``: NeMo's own CUDA calls, for the tests that run
    the real NeMo 2.0.0rc0 on a CPU) the same CPU view as Megatron's; takes effect at
    :func:`activate` (again, if already active)."""
    prefix = package.rstrip(".") + "."
    if prefix not in _state["prefixes"]:
        _state["prefixes"] += (prefix,)
    if _state["active"]:
        activate()


def is_active() -> bool:
    return _state["active"]


def activate() -> bool:
    """Make Megatron-Core run on the CPU when CUDA is absent. Idempotent; returns whether active."""
    if torch.cuda.is_available():
        return False
    if not _state["active"]:
        finder = _RetargetOnImport()
        sys.meta_path.insert(0, finder)
        _undo.append((None, "meta_path", finder))
        _replace(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # raises on a CPU build
        _state["active"] = True
    for name, module in list(sys.modules.items()):
        if (name + ".").startswith(_state["prefixes"]):
            _retarget(module)
    for fix in (_fix_rng_helpers, _fix_grad_clipping, _fix_param_type_checks, _fix_checkpoint_queue,
                _fix_config_defaults):
        try:
            fix()
        except ImportError as e:
            # The module does not import on this version/machine (megatron-core 0.7.0's optimizer
            # needs NVIDIA apex), so there is nothing to fix; remembered for diagnostics.
            SKIPPED[fix.__name__] = repr(e)
    return True


def deactivate() -> None:
    """Undo :func:`activate`: Megatron's modules get the real ``torch`` back, every replaced
    function and method its original, the import hook is removed. Megatron objects built while
    active (models, optimizers) keep CPU tensors and may not work on afterwards."""
    if not _state["active"]:
        return
    _state["active"] = False
    while _undo:
        owner, name, original = _undo.pop()
        if owner is None:  # the import hook
            if original in sys.meta_path:
                sys.meta_path.remove(original)
        elif original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if (name + ".").startswith(_state["prefixes"]) and namespace is not None \
                and namespace.get("torch") is _TORCH:
            namespace["torch"] = torch
    SKIPPED.clear()


@contextlib.contextmanager
def active():
    """The shim for the block only (unless it was already active: then it stays)."""
    was = _state["active"]
    activate()
    try:
        yield
    finally:
        if not was:
            deactivate()
