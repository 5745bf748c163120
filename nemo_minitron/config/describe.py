"""The human-readable summary of an architecture at a parallel layout (``nemo-minitron info``,
``inspect``)."""
from __future__ import annotations

from nemo_minitron.config.arch import ModelConfig


def _int(n: int) -> str:
    return f"{n:,}"


def describe(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> str:
    """Human-readable summary of an architecture at a parallel layout."""
    from nemo_minitron.config import valid_tp_sizes

    rs = cfg.rope_scaling
    rope = (f"llama3 scaling factor {rs.factor:g} (low_freq_factor {rs.low_freq_factor:g}, "
            f"high_freq_factor {rs.high_freq_factor:g}, original context "
            f"{rs.original_max_position_embeddings})" if rs else "no scaling")
    padded = ", ".join(f"TP{t} {cfg.padded_vocab_size(t)}" for t in (1, 2, 4, 8))
    bytes_per = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.dtype]
    lines = [
        f"layers {cfg.num_layers}, hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, "
        f"heads {cfg.num_attention_heads} ({cfg.num_query_groups} query groups, "
        f"{cfg.heads_per_group} heads each), head_dim {cfg.head_dim}",
        f"attention width heads x head_dim = {cfg.q_size} (hidden {cfg.hidden_size}"
        + (", NOT hidden/heads)" if cfg.q_size != cfg.hidden_size else ")"),
        f"vocab {cfg.vocab_size} (padded with divisor {cfg.make_vocab_size_divisible_by}: "
        f"{padded}), {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings",
        f"RoPE theta {cfg.rope_theta:g}, {rope}, max positions {cfg.max_position_embeddings}",
        f"RMSNorm eps {cfg.norm_eps:g}, SwiGLU, no biases, dtype {cfg.dtype}",
        f"parameters {_int(cfg.num_params())} ({_int(cfg.non_embedding_params())} "
        f"non-embedding); {cfg.num_params() * bytes_per / 1e9:.2f} GB in {cfg.dtype}",
        f"valid TP sizes: {', '.join(map(str, valid_tp_sizes(cfg)))}; PP must divide "
        f"{cfg.num_layers} layers",
    ]
    if (tp, pp) != (1, 1):
        per_rank = cfg.num_params(tp) / (tp * pp)
        lines.append(f"layout TP={tp} PP={pp}: ok, padded vocab {cfg.padded_vocab_size(tp)}, "
                     f"~{_int(int(per_rank))} parameters per rank")
    return "\n".join(lines)
