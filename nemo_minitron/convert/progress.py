"""A progress line for conversions (tensors and bytes done) and preprocessing (documents and bytes).
Silent when stderr is not a TTY."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total_tensors: int, total_bytes: int, enabled=None,
                 unit: str = "tensors"):
        self.label, self.total_tensors, self.total_bytes = label, total_tensors, total_bytes
        self.unit = unit
        self.tensors = self.bytes = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self._last = time.time()

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        now = time.time()
        if self.enabled and (now - self._last > 0.2 or self.tensors == self.total_tensors):
            self._last = now
            frac = min(1.0, self.bytes / self.total_bytes) if self.total_bytes else 1.0
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.tensors}/{self.total_tensors} "
                             f"{self.unit}, {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, "
                             f"{now - self.start:.0f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
