"""Sampling parameters and the choice of the next token from full-vocabulary logits.

The filters run in transformers' order (temperature, then top-k, then top-p) with its
conventions: top-k keeps the k largest logits (ties at the k-th value kept), top-p keeps the
smallest set of most likely tokens whose probability reaches ``top_p`` (always at least one).
The reported log-probability of a chosen token is the *model's* (log-softmax of the raw logits),
whatever the filters did, so it equals what :func:`nemo_minitron.inference.score` computes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from nemo_minitron.errors import ConfigError


MAX_TOP_LOGPROBS = 5  # OpenAI's limit for /v1/completions; each one widens the broadcast packet


def is_seed(value) -> bool:
    """What torch.Generator.manual_seed takes without error: an integer in [0, 2**64)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False  # argmax; the other sampling knobs are then ignored
    temperature: float = 1.0  # 0 also means greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 1234  # seeds the sampler's generator: same seed, same tokens
    max_new_tokens: int = 64
    stop: Tuple[str, ...] = field(default_factory=tuple)  # stop strings (need a tokenizer)
    ignore_eos: bool = False  # keep generating past the end-of-text token
    logprobs: bool = False  # return the log-probability of every generated token
    top_logprobs: int = 0  # with logprobs: also the k most likely tokens of each step (<= 5)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop={list(self.stop)!r} must be a list of non-empty strings")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ConfigError(f"temperature={self.temperature!r} must be a number >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r} must be an integer >= 0 (0: off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1]")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) \
                or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"top_logprobs={self.top_logprobs!r} must be an integer in "
                              f"[0, {MAX_TOP_LOGPROBS}]")
        if not is_seed(self.seed):
            raise ConfigError(f"seed={self.seed!r} must be an integer in [0, 2**64)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Temperature, top-k and top-p applied to fp32 logits [b, V]; removed entries are -inf."""
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)  # the unlikely tail holding <= 1 - top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, params: SamplingParams,
                generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(chosen token ids [b], their model log-probabilities [b]) from fp32 logits [b, V]."""
    if params.is_greedy:
        tokens = logits.argmax(-1)
    else:
        probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    logprobs = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs
