"""Which NeMo versions need which patch, and the installed NeMo version (found without importing
NeMo).

Facts read in NVIDIA/NeMo's history (file, function, tag):

* RoPE: up to 2.0.0rc1 (containers 24.05, 24.07) ``MegatronGPTModel.model_provider_func``
  (nemo/collections/nlp/models/language_modeling/megatron_gpt_model.py) builds megatron-core's
  ``GPTModel`` with ``rotary_base``/``seq_len_interpolation_factor`` only: no llama3 scaling.
  From 2.0.0 (24.09; commit 05ced1e "add rope scaling and convertor (#9815)", 2024-08-15)
  ``mcore_model_customize`` scales ``rotary_pos_emb.inv_freq`` when the model config has
  ``scale_positional_embedding: true``, with Llama-3.1's constants hard-coded in
  nemo/collections/common/parts/utils.py ``apply_rope_scaling`` (2.0.x, 2.1.x); from 2.2.0 it reads
  ``scale_factor``/``low_freq_factor``/``high_freq_factor``/``old_context_len`` from the config.
* LoRA on the attention output projection: in 2.0.0rc0 (24.05)
  nemo/collections/nlp/parts/peft_config.py ``LoraPEFTConfig.__init__`` calls
  ``self._create_lora_config(cfg, lora_cfg, cfg.hidden_size, cfg.hidden_size,
  LoraDenseAttentionAdapterConfig)``: the adapter's input width is hidden_size, but linear_proj's
  input is num_attention_heads * kv_channels. Fixed by "support lora when kv_channel !=
  hidden_size / num_heads" (#9636 on main, 2024-07-08; #9644 on r2.0.0rc1), i.e. from 2.0.0rc1
  (24.07) on. NeMo 1.x has no ``attention_dense`` LoRA target at all.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
from typing import Optional, Tuple

from packaging.version import InvalidVersion, Version

from nemo_minitron.errors import MinitronError

NEMO_DISTRIBUTIONS = ("nemo_toolkit", "nemo-toolkit")

ROPE = "rope_llama3"
LORA_DENSE = "lora_dense_width"

# patch -> first NeMo version that no longer needs it
FIXED_IN = {
    ROPE: Version("2.0.0"),
    LORA_DENSE: Version("2.0.0rc1"),
}
# NeMo 2.0.x/2.1.x apply llama3 RoPE with these constants whatever the config says.
HARDCODED_ROPE_UNTIL = Version("2.2.0")
HARDCODED_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


class NemoNotInstalledError(MinitronError):
    """NeMo is not importable in this Python environment."""


def parse_version(text) -> Version:
    if isinstance(text, Version):
        return text
    try:
        return Version(str(text))
    except InvalidVersion:
        raise MinitronError(f"NeMo version {text!r} is not a version number (e.g. 2.0.0rc0)") \
            from None


def needed_patches(version) -> Tuple[str, ...]:
    """The patches NeMo ``version`` needs for this family, in the order they are applied."""
    v = parse_version(version)
    return tuple(name for name, fixed in FIXED_IN.items() if v < fixed)


def nemo_package_dir() -> Optional[str]:
    """The directory of the ``nemo`` package, located without importing it."""
    spec = importlib.util.find_spec("nemo")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _version_from_package_info(package_dir: str) -> Optional[str]:
    """MAJOR.MINOR.PATCH+PRE_RELEASE from nemo/package_info.py, parsed (not executed)."""
    path = os.path.join(package_dir, "package_info.py")
    if not os.path.isfile(path):
        return None
    values = {}
    with open(path, encoding="utf-8") as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        values[target.id] = node.value.value
    if not all(k in values for k in ("MAJOR", "MINOR", "PATCH")):
        return None
    return f"{values['MAJOR']}.{values['MINOR']}.{values['PATCH']}{values.get('PRE_RELEASE', '')}"


def installed_nemo_version() -> Optional[str]:
    """The installed NeMo's version (package metadata, else nemo/package_info.py), or None."""
    package_dir = nemo_package_dir()
    if package_dir is None:
        return None
    for dist in NEMO_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return _version_from_package_info(package_dir)


def require_nemo_version() -> str:
    version = installed_nemo_version()
    if version is None:
        raise NemoNotInstalledError(
            "NeMo is not installed in this Python environment (run inside "
            "nvcr.io/nvidia/nemo:24.05, or pass the NeMo version explicitly to "
            "nemo_minitron.nemo_native.apply)")
    return version
