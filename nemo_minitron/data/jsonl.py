"""JSONL and text input files (SFT records, prompts, documents): one reader, one set of error
messages (file and line), UTF-8 required."""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Sequence, Tuple

from nemo_minitron.errors import ConfigError


def iter_lines(path: str) -> Iterator[Tuple[int, str]]:
    """Yield (line number, text with its newline) of a UTF-8 text file; a line that is not UTF-8
    is a :class:`ConfigError` naming the file and line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} "
                                  f"at column {e.start + 1}); convert the file to UTF-8") from None


def iter_jsonl(path: str, fields: Sequence[str]) -> Iterator[Tuple[int, dict]]:
    """Yield (line number, record) for every non-blank line of ``path``; each record must be a JSON
    object whose ``fields`` are strings. Errors name the file and line."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{lineno}: expected a JSON object with "
                              f"{', '.join(repr(k) for k in fields)}")
        missing = [k for k in fields if not isinstance(record.get(k), str)]
        if missing:
            raise ConfigError(f"{path}:{lineno}: missing or non-string field(s) "
                              f"{', '.join(repr(k) for k in missing)}")
        yield lineno, record


def check_data_file(path: str, label: str, fields: Optional[Sequence[str]] = None) -> None:
    """Read ``path`` once, before any model exists: it must be a file of UTF-8 text and, for a
    ``.jsonl``, one JSON object per non-blank line with ``fields`` as strings. Streams the file
    (no tokenizing), so it costs a fraction of what loading the data costs later."""
    if not os.path.isfile(path):
        raise ConfigError(f"{label} {path}: no such file")
    if path.endswith(".jsonl"):
        for _ in iter_jsonl(path, tuple(fields or ())):
            pass
    else:
        for _ in iter_lines(path):
            pass
