"""The one architecture dataclass for the Llama-3.1 / Minitron family.

Everything that describes the *shape* of a model lives here; how it is trained or run does not.
``head_dim`` is explicit and required: Minitron-4B-Width has hidden 3072 and 32 heads but a head size
of 128, not 3072 / 32 = 96, and deriving it is exactly the bug that breaks NeMo 24.05's converter.

    >>> from nemo_minitron.config import get_preset
    >>> cfg = get_preset("minitron_4b_width")
    >>> cfg.num_params()
    4512746496
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from nemo_minitron.errors import ConfigError

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 ('llama3') RoPE frequency scaling (shared/FACTS.md section 4).

    Frequencies whose wavelength is shorter than ``original_max_position_embeddings / high_freq_factor``
    are kept, longer than ``original / low_freq_factor`` are divided by ``factor``, and those in
    between are interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    rope_type = "llama3"  # class constant: the only scaling this family uses

    def __post_init__(self):
        if not self.factor >= 1.0:
            raise ConfigError(f"rope_scaling.factor={self.factor} must be >= 1")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(
                f"rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}")
        _require_positive_int("rope_scaling.original_max_position_embeddings",
                              self.original_max_position_embeddings)


def _require_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-3.1-family decoder (RMSNorm, SwiGLU, GQA, RoPE, no biases).

    Names follow Megatron-Core; the HF and NeMo names are translated in ``config/hf.py`` and
    ``config/nemo.py`` through one table each.
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # HF num_key_value_heads
    head_dim: int  # HF head_dim, NeMo kv_channels; never hidden_size // num_attention_heads
    vocab_size: int = 128256  # the tokenizer's vocabulary, unpadded
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = field(default_factory=RopeScaling)
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    bos_token_id: int = 128000
    eos_token_id: Union[int, Tuple[int, ...]] = 128001
    # Megatron pads the vocabulary to a multiple of divisor * TP. 32 keeps 128256 = 2^8 * 501
    # unpadded for every TP up to 8 (NeMo's default 128 pads it to 128512 at TP4, 129024 at TP8).
    make_vocab_size_divisible_by: int = 32
    dtype: str = "bfloat16"  # storage dtype of the released weights

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            _require_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta={self.rope_theta} must be positive")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"norm_eps={self.norm_eps} must be in (0, 1)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if isinstance(self.eos_token_id, list):  # plain data from JSON/YAML: keep it hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    # ---- derived sizes --------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def q_size(self) -> int:
        """Width of the attention output before linear_proj: heads * head_dim (4096 for 4B-Width)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.head_dim

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's padded vocabulary: round up to a multiple of divisor * TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def layer_params(self) -> int:
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h  # qkv + proj, no biases
        mlp = 3 * h * self.ffn_hidden_size  # gate, up, down
        return attn + mlp + 2 * h  # + input and pre-MLP RMSNorm

    def embedding_params(self, tp: Optional[int] = None) -> int:
        """Input embedding plus (untied) output layer; padded to Megatron's vocab when tp is given."""
        vocab = self.vocab_size if tp is None else self.padded_vocab_size(tp)
        return vocab * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def num_params(self, tp: Optional[int] = None) -> int:
        """Exact parameter count of the HF model (or of the Megatron model padded for ``tp``)."""
        return self.num_layers * self.layer_params() + self.hidden_size + self.embedding_params(tp)

    def non_embedding_params(self) -> int:
        return self.num_params() - self.embedding_params()

    # ---- plain-data views -----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from plain data (YAML/JSON), rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING and f.name not in d)
        if missing:
            raise ConfigError(f"model config is missing required key(s): {', '.join(missing)}")
        d = dict(d)
        rs = d.get("rope_scaling")
        if isinstance(rs, dict):
            rs_names = {f.name for f in dataclasses.fields(RopeScaling)}
            bad = sorted(set(rs) - rs_names)
            if bad:
                raise ConfigError(f"unknown rope_scaling key(s): {', '.join(bad)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)
