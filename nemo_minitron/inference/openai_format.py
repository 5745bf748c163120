"""OpenAI's completion objects for :mod:`nemo_minitron.inference.serve`: the response body, the
legacy ``logprobs`` object, usage, the error object, and the text deltas of a streamed choice.

    >>> completion_body(server, work, "cmpl-1")["choices"][0]["text"]
"""
from __future__ import annotations

import threading
import time
from typing import List, Optional

from nemo_minitron.inference.generate import _stop_hit

# HF fast tokenizers can raise "Already borrowed" when threads share one: HTTP threads take this
TOKENIZER_LOCK = threading.Lock()


def error_body(status: int, message: str, code: Optional[str] = None) -> dict:
    """OpenAI's error object (what its client raises as BadRequestError, NotFoundError, ...)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _token_text(tokenizer, token: int) -> str:
    if tokenizer is None:  # vLLM's spelling of a token it cannot show as text
        return f"token_id:{token}"
    with TOKENIZER_LOCK:
        return tokenizer.decode([token])


def logprobs_object(tokenizer, tokens, logprobs, top, offset: int = 0) -> dict:
    """OpenAI's legacy completions logprobs: token strings, their logprobs, the top alternatives
    ({token string: logprob}; null when logprobs=0) and each token's offset into the text."""
    texts = [_token_text(tokenizer, t) for t in tokens]
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    alternatives = None
    if top is not None:
        alternatives = [{_token_text(tokenizer, i): lp for i, lp in step} for step in top]
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": alternatives,
            "text_offset": offsets}


def finish_reason(reason: Optional[str]) -> Optional[str]:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason) if reason else None


def usage(work) -> dict:
    prompt = sum(len(p) for p in work.req.prompts)  # each prompt counted once, whatever n is
    completion = sum(len(c.tokens) for c in work.result)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_body(server, work, cid: str) -> dict:
    """The non-streamed answer; ``token_ids`` in each choice is ours (text is null on a server
    without a tokenizer)."""
    choices = []
    for j, c in enumerate(work.result):
        lp = None
        if c.logprobs is not None:
            lp = logprobs_object(server.tokenizer, c.tokens, c.logprobs, c.top_logprobs)
        choices.append({"index": j, "text": c.text, "logprobs": lp,
                        "finish_reason": finish_reason(c.finish_reason), "token_ids": c.tokens})
    return {"id": cid, "object": "text_completion", "created": int(time.time()),
            "model": server.model_name, "choices": choices, "usage": usage(work)}


class TextStream:
    """Text deltas of one streamed choice. Text is held back while it could still be the start
    of a stop string (the final text is cut before it) or ends in an incomplete UTF-8 character,
    so the deltas always add up to the non-streamed text."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: List[int] = []
        self.sent = 0  # characters sent so far

    def delta(self, token: int, finished: bool) -> str:
        self.tokens.append(token)
        if self.tokenizer is None:
            return ""
        with TOKENIZER_LOCK:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if finished:
            cut = _stop_hit(text, self.stop) if self.stop else None
            end = len(text) if cut is None else cut
        else:
            end = max(len(text.rstrip("\ufffd")) - self.hold, self.sent)
        out, self.sent = text[self.sent:end], max(end, self.sent)
        return out
