"""The fields of a pruning job (``nemo-minitron prune``; nemo_minitron/recipes/prune.py): defaults,
overridden by a YAML (``--config``) and then by ``key=value``; unknown keys are errors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class PruneConfig:
    model: str  # teacher: HF checkpoint directory or .nemo (read in place)
    out: str  # student: a directory (HF checkpoint) or a .nemo file
    target: Optional[str] = None  # a preset: minitron_4b_width, minitron_4b_depth, tiny_minitron_*
    hidden_size: Optional[int] = None  # explicit targets override the preset's
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    num_layers: Optional[int] = None
    drop_layers: Optional[List[int]] = None  # teacher layer indices; else chosen by depth_metric
    depth_metric: str = "loss"  # loss: best contiguous block by LM loss; cosine: 1 - cos per layer
    data: str = "pydoc"  # pydoc (Python's documentation prose), or a .txt / .jsonl ('text') file
    tokenizer: Optional[str] = None  # directory with tokenizer.json; default: the teacher's
    calib_samples: int = 1024
    seq_length: int = 4096
    micro_batch_size: int = 1
    tp: int = 1
    pp: int = 1
    dtype: str = "bfloat16"  # of the importance pass (scores accumulate in fp32 regardless)
    scores: Optional[str] = None  # a saved importance.pt: prune with new targets, no forward pass
    overwrite: bool = False
    seed: int = 1234
