"""JSONL input files (SFT records, prompts, documents): one reader, one set of error messages."""
from __future__ import annotations

import json
from typing import Iterator, Sequence, Tuple

from nemo_minitron.errors import ConfigError


def iter_jsonl(path: str, fields: Sequence[str]) -> Iterator[Tuple[int, dict]]:
    """Yield (line number, record) for every non-blank line of ``path``; each record must be a JSON
    object whose ``fields`` are strings. Errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
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
