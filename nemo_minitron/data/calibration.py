"""Calibration token samples for the importance pass of Minitron pruning.

Text comes from one of:

* ``pydoc`` (the default): CPython's own English documentation prose, ``pydoc_data.topics.topics``
  (79 topics, ~465k characters, ~100k Llama-3 tokens), present in every Python install, so the
  tests and the tiny demo need no download;
* a text file (any name but ``*.jsonl``): one document, the whole file;
* a JSONL file (``.jsonl``; one document per line, its ``text`` field).

The same rule holds for every command that reads text (prune's calibration, distillation and
teacher correction with ``data.format: text``, eval-ppl): :func:`iter_documents`.

Each document is tokenized with the teacher's real tokenizer (``tokenizers`` reading
``tokenizer.json``), framed as ``<bos> tokens <eos>``, the documents are concatenated (as in
pretraining) and cut into non-overlapping samples of ``seq_length + 1`` tokens: the input is the
first ``seq_length`` tokens and the LM-loss labels are the same sample shifted by one.
Asking for more samples than the text yields is an error before any model is built.

    >>> ids = calibration_samples("pydoc", "/path/to/hf_dir", num_samples=8, seq_length=64)
    >>> ids.shape
    torch.Size([8, 65])
"""
from __future__ import annotations

import functools
import os
from typing import Iterator, List

import torch

from nemo_minitron.data.jsonl import iter_jsonl, iter_lines
from nemo_minitron.errors import ConfigError, MinitronError

BUILTIN = "pydoc"


def iter_documents(data: str) -> Iterator[str]:
    """The documents of a text source (``pydoc``, a text file, a JSONL file), in a fixed order."""
    if data == BUILTIN:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        for key in sorted(topics):
            yield topics[key]
        return
    if not os.path.isfile(data):
        raise ConfigError(f"data={data}: file not found (give '{BUILTIN}', a text file or a "
                          "JSONL file with a \"text\" field)")
    if data.endswith(".jsonl"):
        for _, record in iter_jsonl(data, ("text",)):
            yield record["text"]
        return
    # a line that is not UTF-8: one error naming it
    text = "".join(line for _, line in iter_lines(data))
    if text.strip():
        yield text


def load_tokenizer(tokenizer_dir: str):
    """The fast tokenizer of an HF checkpoint directory, with the ``tokenizers`` library."""
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{tokenizer_dir}: no tokenizer.json to tokenize the calibration data "
                          "(set tokenizer=DIR)")
    stat = os.stat(path)
    return _load_tokenizer_file(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_tokenizer_file(path: str, mtime_ns: int, size: int):
    """Parsing the Llama-3 tokenizer.json (~7 MB) takes ~1 s: once per file version and process."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MinitronError("calibration data needs the tokenizers package "
                            "(pip install tokenizers)") from None
    return Tokenizer.from_file(path)


def token_samples(data: str, tokenizer_dir: str, seq_length: int, max_samples: int = 0,
                  bos_token_id: int = 128000, eos_token_id: int = 128001) -> torch.Tensor:
    """``[n, seq_length + 1]`` int64: every whole sample the text yields (at most ``max_samples``
    when > 0). Also the pretraining-style data of distillation (loss on every token)."""
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ConfigError(f"seq_length={seq_length!r} must be a positive integer")
    tokenizer = load_tokenizer(tokenizer_dir)
    need = max_samples * (seq_length + 1) if max_samples > 0 else None
    stream: List[int] = []
    for text in iter_documents(data):
        stream.append(bos_token_id)
        stream.extend(tokenizer.encode(text, add_special_tokens=False).ids)
        stream.append(eos_token_id)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // (seq_length + 1)
    if need is not None:
        n = min(n, max_samples)
    return torch.tensor(stream[:n * (seq_length + 1)], dtype=torch.int64).view(n, seq_length + 1)


def calibration_samples(data: str, tokenizer_dir: str, num_samples: int, seq_length: int,
                        bos_token_id: int = 128000, eos_token_id: int = 128001) -> torch.Tensor:
    """``[num_samples, seq_length + 1]`` int64 token ids (see the module docstring)."""
    for name, value in (("calib_samples", num_samples), ("seq_length", seq_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    ids = token_samples(data, tokenizer_dir, seq_length, num_samples, bos_token_id, eos_token_id)
    if ids.shape[0] < num_samples:
        raise ConfigError(
            f"calibration data {data!r} yields {ids.shape[0]} samples of seq_length+1 = "
            f"{seq_length + 1} tokens, fewer than "
            f"calib_samples={num_samples}: use more text, fewer samples or a shorter seq_length")
    return ids
