"""Per-token log-probabilities and sliding-window perplexity on a TP/PP Megatron model.

Sliding window (window W, stride S): windows start at 0, S, 2S, ... and each covers up to W tokens;
every token t >= 1 of a document is scored exactly once, in the first window that contains it
after the previous window's end, with the window's earlier tokens as context. A window never starts
past the previous window's last token, so with S = W consecutive windows share one token (the
context of the next window's first target; least context, fastest), and with S = 1 every token
sees W-1 tokens of context.
The first token of a document (normally BOS) is never scored: nothing predicts it.

    >>> res = perplexity(runner, [tok.encode(text)], window=2048, stride=512)
    >>> res.ppl, res.tokens
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from nemo_minitron.errors import MinitronError
from nemo_minitron.inference.runner import ModelRunner


class ScoringError(MinitronError, ValueError):
    """A scoring request that cannot be served (detected before any forward)."""


def token_logprobs(runner: ModelRunner, sequences: Sequence[Sequence[int]],
                   batch_size: int = 8, greedy: bool = False) -> list:
    """For each sequence (>= 2 ids), fp32 [len-1]: log p(ids[t+1] | ids[:t+1]), on every rank;
    with ``greedy=True`` pairs (that, bool [len-1]: ids[t+1] is the argmax next token).

    Sequences are right-padded into batches; with causal attention the padding after a sequence
    cannot change its scores.
    """
    cfg = runner.cfg
    for i, ids in enumerate(sequences):
        if len(ids) < 2:
            raise ScoringError(f"sequence {i} has {len(ids)} token(s); scoring needs at least 2")
        if len(ids) > cfg.max_position_embeddings:
            raise ScoringError(f"sequence {i} has {len(ids)} tokens, more than the model's "
                               f"max_position_embeddings={cfg.max_position_embeddings}")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ScoringError(f"sequence {i} has token ids outside [0, {cfg.vocab_size})")
    out: list = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)  # [b, s], right-padded with 0
        for i, ids in enumerate(chunk):
            batch[i, : len(ids)] = torch.as_tensor(list(ids))
        if greedy:
            scores, is_max = (t.cpu() for t in runner.score(batch, greedy=True))  # [b, s-1] x2
            out.extend((scores[i, : len(ids) - 1], is_max[i, : len(ids) - 1])
                       for i, ids in enumerate(chunk))
        else:
            scores = runner.score(batch).cpu()  # [b, s-1]
            out.extend(scores[i, : len(ids) - 1] for i, ids in enumerate(chunk))
    return out


def sliding_windows(n: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, first_target) per window over a document of n tokens: the window is
    ids[begin:end], and its targets are the tokens first_target..end-1 (first_target > begin)."""
    if window < 2:
        raise ScoringError(f"window={window} must be >= 2")
    if not 1 <= stride <= window:
        raise ScoringError(f"stride={stride} must be in [1, window={window}]")
    windows, prev_end, begin = [], 1, 0  # token 0 is never a target
    while prev_end < n:
        begin = min(begin, prev_end - 1)  # >= 1 token of context for the first target
        end = min(begin + window, n)
        if end > prev_end:
            windows.append((begin, end, prev_end))
            prev_end = end
        begin += stride
    return windows


@dataclass
class PerplexityResult:
    nll: float  # summed negative log-likelihood (nats) over the scored tokens
    tokens: int  # number of scored tokens
    documents: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


def perplexity(runner: ModelRunner, documents: Sequence[Sequence[int]], window: int,
               stride: int, batch_size: int = 8) -> PerplexityResult:
    """Sliding-window perplexity over documents of token ids (each scored on its own)."""
    if window > runner.cfg.max_position_embeddings:
        raise ScoringError(f"window={window} exceeds the model's max_position_embeddings="
                           f"{runner.cfg.max_position_embeddings}")
    pieces, keep = [], []  # window token ids; how many trailing scores of each count
    for d, ids in enumerate(documents):
        if len(ids) < 2:
            raise ScoringError(f"document {d} has {len(ids)} token(s); perplexity needs >= 2")
        for begin, end, first in sliding_windows(len(ids), window, stride):
            pieces.append(list(ids[begin:end]))
            keep.append(end - first)
    nll, count = 0.0, 0
    scores = token_logprobs(runner, pieces, batch_size)
    for lp, k in zip(scores, keep):
        nll -= float(lp[-k:].double().sum())
        count += k
    return PerplexityResult(nll=nll, tokens=count, documents=len(documents))
