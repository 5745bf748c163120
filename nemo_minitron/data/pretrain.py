"""Pretraining-style rows from Megatron indexed datasets (continued pretraining, distillation).

    data:
      data_prefix: [0.7, /data/web_text_document, 0.3, /data/code_text_document]  # or one prefix
      splits_string: "99,1,0"   # train, validation, test shares of each prefix's documents
      seq_length: 8192

NeMo's conventions (``model.data`` of megatron_gpt_config.yaml): ``data_prefix`` is one prefix, a
list of prefixes (equal weights) or ``[w1, prefix1, w2, prefix2, ...]`` (weights normalised to sum
1); ``splits_string`` cuts each prefix's *documents* into consecutive train / validation / test
ranges at ``round(cumulative share * documents)`` as Megatron's dataset builder does (the test
share is held out and unused here). Without ``splits_string`` every document trains and there is
no validation.

Samples, as Megatron's GPTDataset builds them: per prefix and epoch, the documents (of its split)
in a seeded random order are concatenated (each ends with the EOD that ``preprocess --append-eod``
wrote) and cut into ``(tokens - 1) // seq_length`` windows of ``seq_length + 1`` tokens, window
``j`` starting at token ``j * seq_length`` (consecutive windows share one token); the windows of
an epoch are visited in a seeded random order. Input is ``window[:-1]``, labels ``window[1:]``,
every position carries loss, attention is causal over the whole row (documents are not masked
from each other, NeMo's default ``reset_attention_mask: false``).

Blending: training row ``k`` comes from prefix ``i`` in proportion ``w_i``: each prefix's ``m``-th
sample is placed at time ``(m + 1/2) / w_i`` and the rows are the samples in time order, so every
prefix of the row stream holds ``w_i * k`` samples of prefix ``i`` up to one (Megatron's greedy
blending index has the same property). A prefix whose windows run out starts its next epoch (new
document and window order), so small sources are upsampled as their weight asks. Validation is
every window of every prefix's validation split once, unshuffled, in prefix order.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nemo_minitron.data.indexed import IndexedReader
from nemo_minitron.errors import ConfigError
from nemo_minitron.data.training import RowBatches


# ---- config values ------------------------------------------------------------------------------
def parse_data_prefix(value: Any) -> List[Tuple[float, str]]:
    """NeMo's ``data_prefix`` -> [(normalised weight, prefix)]."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"data.data_prefix={value!r}: give a prefix, a list of prefixes or "
                          "[weight1, prefix1, weight2, prefix2, ...]")
    if all(isinstance(v, str) for v in value):
        pairs = [(1.0, v) for v in value]
    else:
        if len(value) % 2:
            raise ConfigError(f"data.data_prefix={value!r}: an odd number of entries; the weighted "
                              "form is [weight1, prefix1, weight2, prefix2, ...]")
        pairs = list(zip(value[0::2], value[1::2]))
        for w, p in pairs:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not isinstance(p, str):
                raise ConfigError(f"data.data_prefix: ({w!r}, {p!r}) is not a (weight, prefix) "
                                  "pair of a number and a path")
            if not w > 0:
                raise ConfigError(f"data.data_prefix: weight {w} of {p} must be positive")
    total = float(sum(w for w, _ in pairs))
    return [(float(w) / total, p) for w, p in pairs]


def parse_splits(splits: Optional[str]) -> Tuple[float, float, float]:
    """``"99,1,0"`` (or ``"0.99/0.01/0"``) -> normalised (train, validation, test) shares."""
    if splits is None or str(splits).strip() == "":
        return 1.0, 0.0, 0.0
    text = str(splits)
    parts = [p for p in re.split(r"[,/]", text)]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values or len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0 \
            or values[0] <= 0:
        raise ConfigError(f"data.splits_string={text!r}: expected up to three non-negative "
                          "shares 'train,validation,test' with a positive train share, e.g. 99,1,0")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return tuple(v / total for v in values)


def split_documents(num_documents: int, shares: Sequence[float]) -> List[Tuple[int, int]]:
    """Consecutive document ranges per split at ``round(cumulative share * documents)``."""
    bounds, cum = [0], 0.0
    for s in shares:
        cum += s
        bounds.append(int(round(cum * num_documents)))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(len(shares))]


# ---- one prefix ---------------------------------------------------------------------------------
class TokenWindows:
    """Windows of ``seq_length + 1`` tokens over documents ``[lo, hi)`` of one indexed dataset,
    endless in epochs (see the module docstring). ``sample(t)`` is the ``t``-th window drawn."""

    def __init__(self, reader: IndexedReader, lo: int, hi: int, seq_length: int, *,
                 shuffle: bool, seed: int, stream: int):
        self.reader, self.seq_length, self.shuffle = reader, seq_length, shuffle
        self.seed, self.stream = seed, stream
        self.starts = reader.document_starts()[lo:hi]
        self.lengths = reader.document_lengths()[lo:hi]
        self.num_tokens = int(self.lengths.sum())
        self.per_epoch = max(0, (self.num_tokens - 1) // seq_length)
        self._epoch = functools.lru_cache(maxsize=2)(self._build_epoch)  # per source

    def _rng(self, epoch: int, what: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, epoch, what])

    def _build_epoch(self, epoch: int):
        """(document order, token offset of each ordered document [docs + 1], window order)."""
        n_docs = len(self.lengths)
        doc_order = self._rng(epoch, 0).permutation(n_docs) if self.shuffle else np.arange(n_docs)
        offsets = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(self.lengths[doc_order], out=offsets[1:])
        windows = self._rng(epoch, 1).permutation(self.per_epoch) if self.shuffle \
            else np.arange(self.per_epoch)
        return doc_order, offsets, windows

    def sample(self, t: int) -> np.ndarray:
        """``[seq_length + 1]`` int64 token ids."""
        epoch, j = divmod(int(t), self.per_epoch)
        doc_order, offsets, windows = self._epoch(epoch)
        begin = int(windows[j]) * self.seq_length
        end = begin + self.seq_length + 1
        d = int(np.searchsorted(offsets, begin, side="right")) - 1
        pieces, pos = [], begin
        while pos < end:
            doc = int(doc_order[d])
            take = min(end, int(offsets[d + 1])) - pos
            first = int(self.starts[doc]) + pos - int(offsets[d])
            pieces.append(self.reader.tokens[first:first + take])
            pos += take
            d += 1
        return np.concatenate(pieces).astype(np.int64)


def blend_next(weights: Sequence[float], start: np.ndarray,
               count: int) -> Tuple[np.ndarray, np.ndarray]:
    """The next ``count`` rows of the blend: (source index, the source's own sample number), given
    each source's next sample number ``start``. Source ``i``'s ``m``-th sample sits at time
    ``(m + 1/2) / w_i``; rows are samples in time order (ties: lower source first), so the stream
    can be extended chunk by chunk with the same result."""
    margin = 2
    while True:
        cands = [s + np.arange(int(np.ceil(w * count)) + margin) for w, s in zip(weights, start)]
        sources = np.concatenate([np.full(len(c), i) for i, c in enumerate(cands)])
        numbers = np.concatenate(cands)
        times = np.concatenate([(c + 0.5) / w for w, c in zip(weights, cands)])
        order = np.lexsort((sources, times))[:count]
        taken = np.bincount(sources[order], minlength=len(weights))
        if all(t < len(c) for t, c in zip(taken, cands)):  # no source ran out of candidates
            return sources[order], numbers[order]
        margin *= 8


# ---- rows ---------------------------------------------------------------------------------------
def window_row(tokens: np.ndarray) -> Dict[str, torch.Tensor]:
    """A ``seq_length + 1`` token window as a training row (every position counted)."""
    t = torch.from_numpy(tokens)
    s = len(t) - 1
    return dict(input_ids=t[:-1].clone(), labels=t[1:].clone(),
                loss_mask=torch.ones(s, dtype=torch.float32),
                position_ids=torch.arange(s), segment_ids=torch.zeros(s, dtype=torch.long))


class PretrainData(RowBatches):
    """Training rows blended from several :class:`TokenWindows` (``weights``), or, without
    weights, every window of each source once, in order (validation)."""

    def __init__(self, sources: Sequence[TokenWindows], seq_length: int,
                 weights: Optional[Sequence[float]] = None):
        self.sources, self.seq_length, self.weights = list(sources), seq_length, weights
        if weights is None:
            self.bounds = np.cumsum([0] + [s.per_epoch for s in self.sources])
            self.size = int(self.bounds[-1])
        else:
            # rows per "epoch" as all sources have windows (for logs); the blend itself is one
            # endless stream, computed in chunks as training reaches it
            self.size = sum(s.per_epoch for s in self.sources)
            self.source_of = np.zeros(0, dtype=np.int16)
            self.number_of = np.zeros(0, dtype=np.int64)
            self.next_number = np.zeros(len(self.sources), dtype=np.int64)

    def __len__(self) -> int:
        return self.size

    def locate(self, k: int) -> Tuple[int, int]:
        """Row ``k`` -> (source, the source's sample number)."""
        if self.weights is None:
            i = int(np.searchsorted(self.bounds, k, side="right")) - 1
            return i, k - int(self.bounds[i])
        if k >= len(self.source_of):
            count = max(self.size, k + 1 - len(self.source_of))
            src, num = blend_next(self.weights, self.next_number, count)
            self.next_number += np.bincount(src, minlength=len(self.sources))
            self.source_of = np.concatenate([self.source_of, src.astype(np.int16)])
            self.number_of = np.concatenate([self.number_of, num])
        return int(self.source_of[k]), int(self.number_of[k])

    def row(self, k: int) -> Dict[str, torch.Tensor]:
        i, t = self.locate(k)
        return window_row(self.sources[i].sample(t))

    def global_batch_rows(self, step: int, global_batch_size: int) -> List[int]:
        first = step * global_batch_size
        return list(range(first, first + global_batch_size))

    def num_loss_tokens(self, step: int, global_batch_size: int) -> int:
        return global_batch_size * self.seq_length  # every position of every row


def indexed_data(data_prefix: Any, splits_string: Optional[str], seq_length: int, *,
                 shuffle: bool = True, seed: int = 1234):
    """(training rows, validation rows or None) from NeMo-style ``data_prefix`` / ``splits_string``.
    Every error (missing files, a split without one whole window) is raised here, before
    training."""
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ConfigError(f"data.seq_length={seq_length!r} must be a positive integer")
    pairs = parse_data_prefix(data_prefix)
    shares = parse_splits(splits_string)
    train, val = [], []
    for stream, (_, prefix) in enumerate(pairs):
        reader = IndexedReader(prefix)
        (t_lo, t_hi), (v_lo, v_hi), _ = split_documents(reader.num_documents, shares)
        windows = TokenWindows(reader, t_lo, t_hi, seq_length, shuffle=shuffle, seed=seed,
                               stream=stream)
        if windows.per_epoch < 1:
            raise ConfigError(f"data.data_prefix {prefix}: the training split ({t_hi - t_lo} of "
                              f"{reader.num_documents} documents, {windows.num_tokens} tokens) "
                              f"holds no window of seq_length + 1 = {seq_length + 1} tokens")
        train.append(windows)
        if shares[1] > 0:
            held = TokenWindows(reader, v_lo, v_hi, seq_length, shuffle=False, seed=seed,
                                stream=stream)
            if held.per_epoch:
                val.append(held)
    if shares[1] > 0 and not val:
        raise ConfigError(f"data.splits_string={splits_string!r}: the validation split holds no "
                          f"window of seq_length + 1 = {seq_length + 1} tokens in any prefix "
                          "(more data or a larger validation share)")
    weights = [w for w, _ in pairs]
    val_data = PretrainData(val, seq_length) if val else None
    return PretrainData(train, seq_length, weights), val_data


def check_data_source(data) -> None:
    """A recipe's ``data`` section names exactly one training source: a JSONL/text file
    (``train_ds.file_path``) or indexed datasets (``data_prefix``)."""
    if data.data_prefix is not None:
        parse_data_prefix(data.data_prefix)
        parse_splits(data.splits_string)
        if data.train_ds.file_path or data.validation_ds.file_path:
            raise ConfigError("data.data_prefix and data.train_ds/validation_ds.file_path (--data) "
                              "are both set: give one training source")
        # data.format (finetune's default is sft) and distill's data.val_samples describe file
        # sources: indexed data is always pretraining-style, validation comes from splits_string
        if data.train_ds.max_num_samples:
            raise ConfigError("data.train_ds.max_num_samples does not apply to data.data_prefix "
                              "(validation comes from data.splits_string)")
    elif not data.train_ds.file_path:
        raise ConfigError("no training data given (--data / data.train_ds.file_path, or "
                          "data.data_prefix for indexed datasets)")
    elif data.splits_string is not None:
        raise ConfigError("data.splits_string applies to data.data_prefix only")
