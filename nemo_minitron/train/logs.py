"""Training metrics: console (rank 0; a progress bar when stdout is a TTY), CSV always, TensorBoard
when ``tensorboard`` is installed. Only the rank that calls with ``enabled=True`` writes anything.

A metric that is off in this run (``None``, or NaN for any metric but ``loss``: e.g. distillation's
``lm`` when ``kd.lm_weight=0``, ``grad_norm`` when the optimizer reports none) is left out of the
console line and TensorBoard and left empty in the CSV. A NaN ``loss`` is a diverged run and is
always shown."""
from __future__ import annotations

import csv
import math
import os
import sys
from typing import Optional

COLUMNS = ("step", "split", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s")


def is_off(name: str, value) -> bool:
    """Whether metric ``name`` is off in this run (see the module docstring)."""
    return value is None or (name != "loss" and isinstance(value, float) and math.isnan(value))


class MetricsLogger:
    def __init__(self, log_dir: Optional[str], enabled: bool, total_steps: int,
                 progress_bar: bool = True, start_step: int = 0, extra_columns=()):
        self.enabled = enabled
        # extra_columns: a recipe's own metrics (distillation: kl, lm) after the common ones
        self.columns = COLUMNS + tuple(extra_columns)
        self._csv = self._tb = self._bar = None
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "metrics.csv")
            new = not os.path.exists(path)
            self._file = open(path, "a", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=self.columns)
            if new:
                self._csv.writeheader()
            try:  # optional
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir)
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: CSV is enough
                self._tb = None
        if progress_bar and sys.stdout.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def log(self, step: int, split: str, console: bool = True, **metrics):
        if not self.enabled:
            return
        metrics = {k: v for k, v in metrics.items() if not is_off(k, v)}
        row = {"step": step, "split": split}
        row.update({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in metrics.items()})
        if self._csv:
            self._csv.writerow({k: row.get(k, "") for k in self.columns})
            self._file.flush()
        if self._tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        text = " ".join(f"{k} {row[k]}" for k in row if k not in ("step", "split"))
        if self._bar is not None:
            if split == "train":
                self._bar.update(step - self._bar.n)
                self._bar.set_postfix_str(text)
            else:
                self._bar.write(f"step {step} {split}: {text}")
        elif console:
            print(f"step {step} {split}: {text}", flush=True)

    def info(self, text: str):
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self._tb:
            self._tb.close()
        if self._csv:
            self._file.close()
