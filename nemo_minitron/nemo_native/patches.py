"""The patches NeMo 24.05 needs for Llama-3.1-Minitron, installed on the classes in place.

* ``rope_llama3``: megatron-core's ``RotaryEmbedding.__init__`` is wrapped so that, while a model
  config with llama3 RoPE is active, the freshly computed ``inv_freq`` [kv_channels/2] is replaced
  by its llama3-scaled version (nemo_minitron.model.rope.scale_llama3): once per construction,
  from the plain frequencies that constructor just computed.
  NeMo 24.05 builds that object inside ``MegatronGPTModel.model_provider_func`` (GPTModel.__init__
  -> RotaryEmbedding(kv_channels, rotary_percent, ..., seq_len_interpolation_factor,
  rotary_base)); that method is wrapped to make its own ``self.cfg`` the active config while it
  runs, so the .nemo's ``scale_positional_embedding`` (and llama3 constants, see
  nemo_minitron/config/nemo.py) decide. ``apply(model_cfg=...)`` sets a process-wide default for
  models built outside NeMo. Nothing happens when megatron-core scaled it itself
  (``rope_scaling=True``, megatron-core >= 0.10) or the config has no llama3 scaling.
* ``lora_dense_width``: NeMo's ``LoraPEFTConfig._create_lora_config`` is wrapped so that the
  ``LoraDenseAttentionAdapterConfig`` (LoRA on linear_proj) gets ``in_features =
  num_attention_heads * kv_channels`` instead of hidden_size. Like linear_proj, the adapter's
  ``linear_in`` is a RowParallelLinear(input_is_parallel=True): megatron-core divides that global
  width by TP.

* ``packed_tokenizer``: NeMo's ``MegatronBaseModel._build_tokenizer`` is wrapped so that a model
  restored from a .nemo holding our packed HF tokenizer (``tokenizer/``, written by
  ``convert hf-to-nemo``) builds its tokenizer from those files instead of ``tokenizer.type``'s hub
  id: NeMo 2.0.0rc0 loads HF tokenizers only by name (no artifact path), so an offline cluster could
  not restore the model without an override. The restore folder is NeMo's own
  (``AppState().nemo_file_folder`` while ``_is_model_being_restored()``, where it extracted the
  archive); the config keeps its hub id, so a model NeMo saves again is unchanged. Every NeMo
  version with that method gets it (none reads the packed files).

Targets are named by dotted path and looked up when :func:`apply` runs; NeMo is imported only
then, and only when installed. Every wrapper is installed once (a second ``apply`` changes nothing)
and can be removed with :func:`remove`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect
import os
from typing import Callable, Dict, List, Optional, Tuple

from nemo_minitron.config.arch import ModelConfig, RopeScaling
from nemo_minitron.config.nemo import DoubleRopeScalingError, read_rope_scaling
from nemo_minitron.errors import ConfigError, MinitronError
from nemo_minitron.nemo_native import versions

ROTARY_TARGET = ("megatron.core.models.common.embeddings.rotary_pos_embedding:"
                 "RotaryEmbedding.__init__")
NEMO_GPT_TARGET = ("nemo.collections.nlp.models.language_modeling.megatron_gpt_model:"
                   "MegatronGPTModel.model_provider_func")
NEMO_LORA_TARGET = "nemo.collections.nlp.parts.peft_config:LoraPEFTConfig._create_lora_config"
NEMO_TOKENIZER_TARGET = ("nemo.collections.nlp.models.language_modeling.megatron_base_model:"
                         "MegatronBaseModel._build_tokenizer")
PACKED_TOKENIZER = "packed_tokenizer"
DENSE_ADAPTER_CONFIG = "LoraDenseAttentionAdapterConfig"  # looked up in the LoRA target's module

SCALED_FLAG = "_nemo_minitron_llama3"  # marks a RotaryEmbedding whose inv_freq we scaled
_WRAPPED_FLAG = "_nemo_minitron_wrapped"

_UNSET = object()
_active = contextvars.ContextVar("nemo_minitron_rope_scaling", default=_UNSET)
_default = {"scaling": None}
_installed: List[Tuple[object, str, object]] = []  # (owner, attribute, original) for remove()


class NemoPatchError(MinitronError):
    """A patch target is missing or not what the patch was written against."""


# ---------------------------------------------------------------------------------- pure parts

def dense_lora_in_features(num_attention_heads: int, kv_channels: int) -> int:
    """Input width of the LoRA adapter on linear_proj: linear_proj's input, heads*head_dim
    (global; each TP rank holds 1/TP of it, as for linear_proj [hidden, heads*head_dim/TP])."""
    return int(num_attention_heads) * int(kv_channels)


def rope_scaling_of(model_cfg) -> Optional[RopeScaling]:
    """llama3 scaling of a NeMo model config (mapping or DictConfig), a ModelConfig, or a
    RopeScaling; None for none."""
    if model_cfg is None or isinstance(model_cfg, RopeScaling):
        return model_cfg
    if isinstance(model_cfg, ModelConfig):
        return model_cfg.rope_scaling
    return read_rope_scaling(model_cfg)


@contextlib.contextmanager
def rope_scaling_for(model_cfg):
    """Models built inside this block get ``model_cfg``'s RoPE (None: plain RoPE)."""
    token = _active.set(rope_scaling_of(model_cfg))
    try:
        yield
    finally:
        _active.reset(token)


def active_rope_scaling() -> Optional[RopeScaling]:
    value = _active.get()
    return _default["scaling"] if value is _UNSET else value


def check_hardcoded_rope(version, model_cfg) -> None:
    """NeMo 2.0.x/2.1.x scale RoPE with fixed constants: refuse a config whose constants differ."""
    rs = rope_scaling_of(model_cfg)
    if rs is None or versions.parse_version(version) >= versions.HARDCODED_ROPE_UNTIL:
        return
    differ = {k: getattr(rs, k) for k, v in versions.HARDCODED_ROPE.items()
              if float(getattr(rs, k)) != float(v)}
    if differ:
        raise ConfigError(f"NeMo {version} applies llama3 RoPE with {versions.HARDCODED_ROPE} "
                          f"hard-coded, but the model config has {differ}: use NeMo >= 2.2")


# ------------------------------------------------------------------------------------ wrappers

def _wrap_rotary_init(original: Callable) -> Callable:
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        rs = active_rope_scaling()
        if rs is None:
            return
        if signature.bind(self, *args, **kwargs).arguments.get("rope_scaling"):
            return  # megatron-core >= 0.10 applied llama3 scaling itself
        if getattr(self, "seq_len_interpolation_factor", None) is not None:
            raise DoubleRopeScalingError(
                f"seq_len_interpolation_factor={self.seq_len_interpolation_factor} together with "
                "llama3 RoPE scaling would scale RoPE twice; remove seq_len_interpolation_factor")
        from nemo_minitron.model.rope import scale_llama3

        self.inv_freq = scale_llama3(self.inv_freq, rs)
        setattr(self, SCALED_FLAG, True)

    return __init__


def _wrap_model_provider(original: Callable) -> Callable:
    def model_provider_func(self, *args, **kwargs):
        with rope_scaling_for(self.cfg):
            return original(self, *args, **kwargs)

    return model_provider_func


def _wrap_create_lora_config(original: Callable, dense_cfg_cls) -> Callable:
    signature = inspect.signature(original)

    def _create_lora_config(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        a = bound.arguments
        if a.get("adapter_cfg_cls") is dense_cfg_cls:
            cfg = a["cfg"]
            # NeMo's own kv_channels rule (explicit kv_channels, else hidden/heads)
            a["in_features"] = dense_lora_in_features(cfg.num_attention_heads,
                                                      self._calculate_kv_channels(cfg))
        return original(*bound.args, **bound.kwargs)

    return _create_lora_config


def packed_tokenizer_dir(model) -> Optional[str]:
    """The HF tokenizer packed in the .nemo ``model`` is being restored from, else None."""
    from nemo.utils import AppState

    from nemo_minitron.convert.nemo_file import TOKENIZER_DIR

    if not model._is_model_being_restored():
        return None
    folder = AppState().nemo_file_folder
    packed = os.path.join(folder, TOKENIZER_DIR) if folder else None
    return packed if packed and os.path.isfile(os.path.join(packed, "tokenizer.json")) else None


def _wrap_build_tokenizer(original: Callable) -> Callable:
    def _build_tokenizer(self):
        section = self._cfg.tokenizer
        packed = packed_tokenizer_dir(self) if section.get("library") == "huggingface" else None
        if packed is None:
            return original(self)
        from omegaconf import open_dict

        name = section.get("type")
        with open_dict(section):
            section.type = packed
        try:
            return original(self)
        finally:
            with open_dict(section):
                section.type = name  # the config keeps what the .nemo says

    return _build_tokenizer


# ------------------------------------------------------------------------------- installation

def _resolve(target: str) -> Tuple[object, str, object]:
    """'pkg.module:Class.attr' -> (Class, 'attr', current attribute); raises NemoPatchError."""
    module_name, _, path = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise NemoPatchError(f"cannot import {module_name} to patch {target}: {e}") from None
    *owners, attr = path.split(".")
    for name in owners:
        obj = getattr(obj, name, None)
        if obj is None:
            raise NemoPatchError(f"{target}: {module_name} has no {name}")
    if not hasattr(obj, attr):
        raise NemoPatchError(f"{target}: {path} does not exist")
    return obj, attr, getattr(obj, attr)


def _install(target: str, make_wrapper: Callable[[Callable], Callable]) -> bool:
    """Wrap ``target`` once; False when it is wrapped already."""
    owner, attr, current = _resolve(target)
    if getattr(current, _WRAPPED_FLAG, False):
        return False
    wrapper = functools.wraps(current)(make_wrapper(current))
    setattr(wrapper, _WRAPPED_FLAG, True)
    setattr(owner, attr, wrapper)
    _installed.append((owner, attr, current))
    return True


def _module_present(target: str) -> bool:
    top = target.partition(":")[0].split(".")[0]
    return importlib.util.find_spec(top) is not None


def apply(nemo_version: Optional[str] = None, model_cfg=None, *,
          rotary_target: str = ROTARY_TARGET, nemo_gpt_target: str = NEMO_GPT_TARGET,
          nemo_lora_target: str = NEMO_LORA_TARGET,
          nemo_tokenizer_target: str = NEMO_TOKENIZER_TARGET) -> Dict[str, List[str]]:
    """Install the patches NeMo ``nemo_version`` (default: the installed one) needs.

    ``model_cfg``: a NeMo model config (mapping/DictConfig), ModelConfig or RopeScaling whose llama3
    RoPE applies to every model built from now on outside NeMo's model_provider_func (inside it,
    NeMo's own ``self.cfg`` decides). Returns {patch name: targets newly wrapped}. The NeMo targets
    are patched only when NeMo is installed; the ``*_target`` arguments exist for tests.
    """
    version = nemo_version if nemo_version is not None else versions.require_nemo_version()
    needed = versions.needed_patches(version)
    applied: Dict[str, List[str]] = {}
    if versions.ROPE in needed:
        if model_cfg is not None:
            _default["scaling"] = rope_scaling_of(model_cfg)
        done = [t for t in (rotary_target,) if _install(t, _wrap_rotary_init)]
        if _module_present(nemo_gpt_target) and _install(nemo_gpt_target, _wrap_model_provider):
            done.append(nemo_gpt_target)
        applied[versions.ROPE] = done
    elif model_cfg is not None:
        check_hardcoded_rope(version, model_cfg)
    if versions.LORA_DENSE in needed and _module_present(nemo_lora_target):
        owner, _, _ = _resolve(nemo_lora_target)
        dense_cls = getattr(inspect.getmodule(owner), DENSE_ADAPTER_CONFIG, None)
        if dense_cls is None:  # NeMo 1.x: no LoRA on linear_proj, nothing to fix
            applied[versions.LORA_DENSE] = []
        else:
            wrap = functools.partial(_wrap_create_lora_config, dense_cfg_cls=dense_cls)
            applied[versions.LORA_DENSE] = [nemo_lora_target] if _install(nemo_lora_target, wrap) \
                else []
    if _module_present(nemo_tokenizer_target):
        try:
            _resolve(nemo_tokenizer_target)
        except NemoPatchError:  # a NeMo without MegatronBaseModel._build_tokenizer: nothing to do
            return applied
        applied[PACKED_TOKENIZER] = [nemo_tokenizer_target] if _install(
            nemo_tokenizer_target, _wrap_build_tokenizer) else []
    return applied


def remove() -> None:
    """Undo every wrapper :func:`apply` installed and forget the default model config."""
    while _installed:
        owner, attr, original = _installed.pop()
        setattr(owner, attr, original)
    _default["scaling"] = None
