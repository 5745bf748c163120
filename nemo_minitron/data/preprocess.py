"""JSONL -> Megatron indexed datasets, as NeMo's ``preprocess_data_for_megatron.py`` writes them.

    nemo-minitron preprocess --input corpus.jsonl --json-keys text --output-prefix data/corpus \\
        --append-eod [--tokenizer HF_DIR_OR_TOKENIZER_JSON] [--workers 4] [--overwrite]

writes ``data/corpus_text_document.bin`` / ``.idx`` (``<prefix>_<key>_document``, one pair per
JSON key), the names NeMo gives them and ``data.data_prefix`` then points at.

What NeMo's script does, and so this does: each line is a JSON object; every ``--json-keys`` field
is one document, tokenized without special tokens (NeMo's ``text_to_ids``: no BOS), with the
tokenizer's EOS (``<|end_of_text|>``, 128001) appended under ``--append-eod``; documents that
tokenize to nothing are skipped; one sequence per document (no sentence splitting). The token dtype
is int32 for Llama-3's 128256 ids (uint16 below 65500). Without ``--tokenizer`` the real Llama-3.1
tokenizer of :mod:`nemo_minitron.tokenizer` is used.

The input is validated in a first pass (JSON, every key a string, line numbers in errors) before
any tokenizing; outputs are written under temporary names and renamed at the end; an existing
output is an error without ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

from nemo_minitron.data.jsonl import iter_jsonl
from nemo_minitron.errors import ConfigError, MinitronError

EOD_TOKEN = "<|end_of_text|>"
BATCH = 256  # records per tokenizer call / worker task


def output_prefix(prefix: str, key: str) -> str:
    """NeMo's naming: ``<prefix>_<key>_document`` (``_sentence`` with sentence splitting)."""
    return f"{prefix}_{key}_document"


def _given_tokenizer_dir(path: str) -> str:
    directory = os.path.dirname(path) if os.path.isfile(path) else path
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise ConfigError(f"--tokenizer {path}: no tokenizer.json there (give an HF checkpoint "
                          "directory or its tokenizer.json)")
    return directory


@contextlib.contextmanager
def tokenizer_dir(path: Optional[str]):
    """A directory holding ``tokenizer.json``: ``path`` (a directory or the file itself), or the
    real Llama-3.1 tokenizer written to a temporary directory."""
    if path:
        yield _given_tokenizer_dir(path)
        return
    from nemo_minitron.tokenizer import write_tokenizer_files

    from nemo_minitron.checkpoint import scratch

    tmp = scratch.make_dir("llama31-tokenizer-")  # a killed run's copy goes with the next run
    try:
        write_tokenizer_files(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_worker_tokenizer = None


def _init_worker(directory: str) -> None:
    global _worker_tokenizer
    from nemo_minitron.data.calibration import load_tokenizer

    _worker_tokenizer = load_tokenizer(directory)


def _encode(texts: List[str]):
    """(token ids per text, characters encoded)."""
    ids = [e.ids for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)]
    return ids, sum(len(t) for t in texts)


def _batches(path: str, keys: Sequence[str]):
    """Lists of ``BATCH`` records' texts, key-major within a batch: ``[k0 r0, k0 r1, ..., k1 r0,
    ...]`` (one tokenizer call per batch)."""
    records: List[dict] = []
    for _, rec in iter_jsonl(path, keys):
        records.append(rec)
        if len(records) == BATCH:
            yield [r[k] for k in keys for r in records]
            records = []
    if records:
        yield [r[k] for k in keys for r in records]


def preprocess(input_path: str, prefix: str, json_keys: Sequence[str] = ("text",),
               tokenizer: Optional[str] = None, append_eod: bool = False, workers: int = 1,
               overwrite: bool = False, progress: Optional[bool] = None) -> Dict[str, dict]:
    """Write one indexed dataset per key; returns ``{key: {prefix, documents, tokens, dtype,
    skipped}}``."""
    from nemo_minitron.convert.progress import Progress
    from nemo_minitron.data.indexed import IndexedWriter, bin_path, idx_path

    if not json_keys:
        raise ConfigError("--json-keys: give at least one key")
    if len(set(json_keys)) != len(json_keys):
        raise ConfigError(f"--json-keys {' '.join(json_keys)}: a key is repeated")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers {workers}: must be a positive integer")
    if not os.path.isfile(input_path):
        raise ConfigError(f"--input {input_path}: no such file")
    if tokenizer:
        _given_tokenizer_dir(tokenizer)
    prefixes = {k: output_prefix(prefix, k) for k in json_keys}
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output

    for path in [f(p) for p in prefixes.values() for f in (bin_path, idx_path)]:
        # never over an input; writable; a file, not a directory
        check_disjoint({"--output-prefix": path}, {"--input": input_path, "--tokenizer": tokenizer})
        check_output(path, "--output-prefix", overwrite=overwrite, kind="file")
    if not overwrite:
        for p in prefixes.values():
            for path in (bin_path(p), idx_path(p)):
                if os.path.exists(path):
                    raise MinitronError(f"{path} exists; pass --overwrite to replace it")
    # pass 1: every line valid and holding every key (errors name the line), sizes for progress
    num_records = num_chars = 0
    for _, rec in iter_jsonl(input_path, json_keys):
        num_records += 1
        num_chars += sum(len(rec[k]) for k in json_keys)
    if num_records == 0:
        raise ConfigError(f"--input {input_path}: no JSON records (the file is empty)")

    with tokenizer_dir(tokenizer) as tok_dir, contextlib.ExitStack() as stack:
        _init_worker(tok_dir)
        tok = _worker_tokenizer
        eod = tok.token_to_id(EOD_TOKEN)
        if append_eod and eod is None:
            raise ConfigError(f"{tok_dir}/tokenizer.json has no {EOD_TOKEN} token for --append-eod")
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        writers = {k: stack.enter_context(IndexedWriter(p, vocab_size, overwrite=overwrite))
                   for k, p in prefixes.items()}
        skipped = dict.fromkeys(json_keys, 0)
        if workers > 1:
            import multiprocessing

            from nemo_minitron import lifecycle

            lifecycle.tie_children()  # the workers die with this process, however it ends
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(tok_dir,)))
            encoded = pool.imap(_encode, _batches(input_path, json_keys))
        else:
            encoded = map(_encode, _batches(input_path, json_keys))
        bar = Progress(f"preprocess {os.path.basename(input_path)}", num_records, num_chars,
                       enabled=progress, unit="records")
        start = time.time()
        for ids, chars in encoded:
            n = len(ids) // len(json_keys)
            for j, key in enumerate(json_keys):
                for doc in ids[j * n:(j + 1) * n]:
                    if not doc:  # NeMo skips documents without tokens
                        skipped[key] += 1
                        continue
                    writers[key].add_document(doc + [eod] if append_eod else doc)
            bar.update(chars, tensors=n)
        bar.close()
    seconds = time.time() - start
    return {k: dict(prefix=prefixes[k], documents=w.num_documents, tokens=w.num_tokens,
                    dtype=w.dtype.name, skipped=skipped[k], seconds=seconds)
            for k, w in writers.items()}
