"""Megatron's MMap indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``): a streaming writer and a
small reader.

The format, as written by NeMo's ``preprocess_data_for_megatron.py`` (NeMo's
``MMapIndexedDatasetBuilder``) and read by Megatron-Core's ``IndexedDataset`` (the same in 0.7.0
and 0.16.1, ``megatron/core/datasets/indexed_dataset.py``), all little-endian:

    .bin   the token ids of every sequence back to back, in the index dtype, nothing else
    .idx   b"MMIDIDX\\x00\\x00"            9 bytes, magic
           <Q  version = 1
           <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
               8 uint16)
           <Q  sequence count S
           <Q  document-index count D + 1 (the document index starts with 0)
           int32[S]     sequence lengths in tokens
           int64[S]     sequence pointers: byte offset of each sequence in .bin
           int64[D + 1] document index: document d is sequences [doc[d], doc[d + 1])

Without sentence splitting every document is one sequence (``doc = 0, 1, ..., D``). The dtype
follows the vocabulary as Megatron's ``DType.optimal_dtype`` / NeMo's ``__best_fitting_dtype`` do:
uint16 below 65500 ids, int32 otherwise (Llama-3's 128256 ids -> int32).

    >>> with IndexedWriter("/data/wiki_text_document", vocab_size=128256) as w:
    ...     w.add_document([791, 4062, 128001])
    >>> IndexedReader("/data/wiki_text_document").document(0).tolist()
    [791, 4062, 128001]
"""
from __future__ import annotations

import os
import struct
from array import array
from typing import Sequence

import numpy as np

from nemo_minitron.checkpoint import scratch
from nemo_minitron.errors import ConfigError, MinitronError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34: magic, version, dtype code, two counts


def dtype_for_vocab(vocab_size: int):
    """uint16 for vocabularies below 65500 ids, int32 otherwise (Megatron's and NeMo's rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dtype_code(dtype) -> int:
    for code, d in DTYPE_CODES.items():
        if np.dtype(d) == np.dtype(dtype):
            return code
    raise ConfigError(f"dtype {dtype} has no code in the indexed format")


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class IndexedWriter:
    """Stream documents into ``<prefix>.bin/.idx`` under temporary names; :meth:`close` writes the
    index and renames both into place (an exception removes them, an existing output is kept).

    Memory: 12 bytes per sequence and 8 per document for the index; tokens go straight to disk."""

    def __init__(self, prefix: str, vocab_size: int, overwrite: bool = False):
        self.prefix = os.path.abspath(prefix)
        self.dtype = np.dtype(dtype_for_vocab(vocab_size))
        self.vocab_size = vocab_size
        for path in (bin_path(self.prefix), idx_path(self.prefix)):
            if os.path.exists(path) and not overwrite:
                raise MinitronError(f"{path} exists; pass --overwrite to replace it")
        parent = os.path.dirname(self.prefix)
        os.makedirs(parent, exist_ok=True)
        base = os.path.basename(self.prefix)
        # named after this process: a killed run's partial file goes with the next run here
        fd, self._tmp_bin = scratch.make_file(".tmp-", parent, stem=f".{base}.bin")
        self._bin = os.fdopen(fd, "wb")
        self.lengths = array("i")  # int32 per sequence
        self.doc_index = array("q", [0])  # int64, sequences before each document boundary
        self.num_tokens = 0

    # -- writing --------------------------------------------------------------------------------
    def add_document(self, ids: Sequence[int]) -> None:
        """One document as one sequence (NeMo's layout without sentence splitting)."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise MinitronError(f"token id out of range [0, {self.vocab_size}) in document "
                                f"{len(self.doc_index) - 1}")
        self._bin.write(arr.astype(self.dtype).tobytes(order="C"))
        self.lengths.append(arr.size)
        self.num_tokens += arr.size
        self.doc_index.append(len(self.lengths))

    @property
    def num_documents(self) -> int:
        return len(self.doc_index) - 1

    def _write_index(self, path: str) -> None:
        lengths = np.frombuffer(self.lengths, dtype=np.int32) if len(self.lengths) else \
            np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * self.dtype.itemsize
        with open(path, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", dtype_code(self.dtype)))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self.doc_index)))
            f.write(lengths.astype("<i4").tobytes(order="C"))
            f.write(pointers.astype("<i8").tobytes(order="C"))
            f.write(np.frombuffer(self.doc_index, dtype=np.int64).astype("<i8").tobytes(order="C"))

    def close(self) -> None:
        self._bin.close()
        parent, base = os.path.dirname(self.prefix), os.path.basename(self.prefix)
        fd, tmp_idx = scratch.make_file(".tmp-", parent, stem=f".{base}.idx")
        os.close(fd)
        try:
            self._write_index(tmp_idx)
            umask = os.umask(0)
            os.umask(umask)
            for tmp in (self._tmp_bin, tmp_idx):  # mkstemp makes 0600 files
                os.chmod(tmp, 0o666 & ~umask)
            # .bin first: a reader opens a dataset by its .idx, which appears last
            os.replace(self._tmp_bin, bin_path(self.prefix))
            os.replace(tmp_idx, idx_path(self.prefix))
        except BaseException:
            for tmp in (self._tmp_bin, tmp_idx):
                if os.path.exists(tmp):
                    os.remove(tmp)
            raise

    def abort(self) -> None:
        self._bin.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class IndexedReader:
    """Read-only view of ``<prefix>.bin/.idx`` (numpy memmaps; nothing is loaded up front).

    Every header field is checked, with an error naming the file, before any token is read."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise MinitronError(f"{path}: missing (data prefix {prefix!r} needs .bin and .idx; "
                                    "write them with `nemo-minitron preprocess`)")
        size = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
            raise MinitronError(f"{ipath}: not a Megatron MMap index (no {MAGIC!r} header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            raise MinitronError(f"{ipath}: index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise MinitronError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if size not in (expected, expected + n_seq):  # + int8 modes of multimodal datasets
            raise MinitronError(f"{ipath}: {size} bytes, but the header's counts ({n_seq} "
                                f"sequences, {n_doc} document-index entries) need {expected}")
        index = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = HEADER_BYTES
        self.sequence_lengths = index[off:off + 4 * n_seq].view("<i4")
        off += 4 * n_seq
        self.sequence_pointers = index[off:off + 8 * n_seq].view("<i8")
        off += 8 * n_seq
        self.document_indices = index[off:off + 8 * n_doc].view("<i8")
        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise MinitronError(f"{ipath}: the document index must run from 0 to the sequence "
                                f"count {n_seq}")
        total = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if os.path.getsize(bpath) != total:
            raise MinitronError(f"{bpath}: {os.path.getsize(bpath)} bytes, the index describes "
                                f"{total}")
        self.tokens = np.memmap(bpath, mode="r", dtype=self.dtype) if total else \
            np.zeros(0, self.dtype)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_lengths(self) -> np.ndarray:
        """``[num_documents]`` int64 token counts (a document's sequences are contiguous)."""
        cum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return cum[self.document_indices[1:]] - cum[self.document_indices[:-1]]

    def document_starts(self) -> np.ndarray:
        """``[num_documents]`` int64 offset of each document's first token in ``tokens``."""
        cum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return cum[self.document_indices[:-1]]

    def document(self, d: int) -> np.ndarray:
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if hi == lo:
            return self.tokens[0:0]
        first = int(self.sequence_pointers[lo]) // self.dtype.itemsize
        n = int(self.sequence_lengths[lo:hi].sum(dtype=np.int64))
        return self.tokens[first:first + n]
