"""``nemo-minitron inspect PATH``: what a checkpoint is, and what is wrong with it.

PATH: a .nemo file, an extracted .nemo directory, or an HF checkpoint directory. Reports the
architecture, parameter count, stored dtype, weight layout, TP/PP, padded vocabulary and tokenizer,
then diagnoses the known bad states of this family:

* head_dim inconsistent with the stored tensors (the hidden/heads = 96 bug);
* llama3 RoPE missing (NeMo 24.05-era configs) or applied twice (NeMo 24.09-2.1 converters);
* fp16 storage of a bf16-trained model;
* a tokenizer that points at a gated hub id (meta-llama/...) or is missing;
* an embedding with fewer rows than the vocabulary (export cannot slice it back).

Exit status: 0 healthy, 1 problems found, 2 unreadable input.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.errors import ConfigError

GATED_PREFIXES = ("meta-llama/",)
DTYPE_NAMES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32",
               "BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass
class Report:
    kind: str
    cfg: Optional[ModelConfig] = None
    facts: List[Tuple[str, str]] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    def text(self) -> str:
        from nemo_minitron.config.describe import describe

        lines = [self.kind]
        if self.cfg is not None:
            lines += ["  " + line for line in describe(self.cfg).splitlines()]
        lines += [f"  {k}: {v}" for k, v in self.facts]
        if self.problems:
            lines.append(f"  PROBLEMS ({len(self.problems)}):")
            lines += [f"   - {p}" for p in self.problems]
        else:
            lines.append("  no known problems found")
        return "\n".join(lines)


def _dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(str(dtype), str(dtype).replace("torch.", ""))


def _rope_problems(cfg: ModelConfig, report: Report) -> None:
    if cfg.rope_scaling is None:
        report.problems.append("llama3 RoPE scaling is missing: Llama-3.1 models need rope_scaling "
                               "{rope_type: llama3, factor: 8, ...}; without it every output is "
                               "perturbed")


def _dtype_problem(stored: str, report: Report) -> None:
    report.facts.append(("stored dtype", stored))
    if stored == "float16":
        report.problems.append("weights are stored in fp16, but the family is trained in bf16: fp16 "
                               "can overflow (reconvert with --dtype bf16)")


def _vocab_problem(cfg: ModelConfig, rows: int, report: Report) -> None:
    report.facts.append(("embedding rows", f"{rows} (vocabulary {cfg.vocab_size})"))
    if rows < cfg.vocab_size:
        report.problems.append(f"the embedding has {rows} rows, fewer than the {cfg.vocab_size}-token "
                               "vocabulary: export cannot produce a consistent HF checkpoint")


def inspect_hf(path: str) -> Report:
    from safetensors import safe_open

    from nemo_minitron.checkpoint.hf_io import read_weight_map
    from nemo_minitron.config.hf import check_hf_shapes, read_hf_config

    cfg = read_hf_config(path)
    report = Report(kind=f"HF checkpoint {path}", cfg=cfg)
    weight_map = read_weight_map(path)
    shapes: Dict[str, tuple] = {}
    dtypes = set()
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                dtypes.add(_dtype_name(sl.get_dtype()))
    report.facts.append(("weights", f"{len(shapes)} tensors in {len(set(weight_map.values()))} "
                                    "safetensors shard(s)"))
    _dtype_problem(", ".join(sorted(dtypes)), report)
    try:
        check_hf_shapes(cfg, shapes)
    except ConfigError as e:
        report.problems.append(str(e))
    if "model.embed_tokens.weight" in shapes:
        _vocab_problem(cfg, shapes["model.embed_tokens.weight"][0], report)
    _rope_problems(cfg, report)
    has_tok = os.path.isfile(os.path.join(path, "tokenizer.json"))
    report.facts.append(("tokenizer", "tokenizer.json" if has_tok else "none"))
    if not has_tok:
        report.problems.append("no tokenizer.json: transformers and our jobs cannot tokenize")
    return report


def _stored_qkv_rows(shapes) -> Optional[int]:
    entry = shapes.get("decoder.layers.self_attention.linear_qkv.weight")
    if entry is None:
        return None
    shape = entry[0]
    return shape[-2] if len(shape) >= 2 else None


def inspect_nemo(path: str) -> Report:
    from nemo_minitron.config.nemo import DoubleRopeScalingError, load_yaml
    from nemo_minitron.convert.nemo_file import CONFIG_NAME, opened_nemo
    from nemo_minitron.convert.nemo_to_hf import read_config, tokenizer_dir, weights_reader

    with opened_nemo(path) as root:
        raw = load_yaml(os.path.join(root, CONFIG_NAME))
        problems = []
        try:
            cfg = read_config(root, path)
        except DoubleRopeScalingError as e:
            problems.append(str(e).split(": ", 1)[-1])
            from nemo_minitron.config.nemo import read_nemo_config

            cfg = read_nemo_config(os.path.join(root, CONFIG_NAME), label=path,
                                   vocab_size=raw.get("vocab_size") or 128256,
                                   repair_double_rope=True)
        report = Report(kind=f".nemo {path}", cfg=cfg, problems=problems)
        layout, reader = weights_reader(root, cfg)
        report.facts.append(("weights layout", layout))
        report.facts.append(("TP/PP in model_config.yaml",
                             f"{raw.get('tensor_model_parallel_size', 1)}/"
                             f"{raw.get('pipeline_model_parallel_size', 1)}"))
        shapes = reader.shapes() if hasattr(reader, "shapes") else None
        if shapes:
            emb = shapes.get("embedding.word_embeddings.weight")
            if emb is not None:
                _dtype_problem(_dtype_name(emb[1]), report)
                _vocab_problem(cfg, emb[0][0], report)
            rows = _stored_qkv_rows(shapes)
            heads_and_kv = cfg.num_attention_heads + 2 * cfg.num_query_groups
            if rows is not None and rows != heads_and_kv * cfg.head_dim:
                implied = rows / heads_and_kv
                report.problems.append(
                    f"head_dim (kv_channels) = {cfg.head_dim} is inconsistent with the stored "
                    f"linear_qkv ({rows} rows = {heads_and_kv} heads x {implied:g}): set "
                    f"kv_channels: {implied:g}")
        _rope_problems(cfg, report)
        tok = raw.get("tokenizer") or {}
        tok_type = tok.get("type") if isinstance(tok, dict) else None
        packed = tokenizer_dir(root)
        report.facts.append(("tokenizer", f"type {tok_type!r}" + (", HF files packed in the .nemo"
                                                                   if packed else "")))
        if isinstance(tok_type, str) and tok_type.startswith(GATED_PREFIXES) and not packed:
            report.problems.append(f"tokenizer.type {tok_type!r} is a gated hub id: restoring needs "
                                   "hub access and a license grant; pack the tokenizer "
                                   "(--tokenizer-type) or point it at a local directory")
        if raw.get("precision") in (16, "16", "16-mixed"):
            report.problems.append("precision 16 (fp16) in model_config.yaml: this family is bf16")
        _restore_key_problems(raw, report)
        return report


def _restore_key_problems(raw: dict, report: Report) -> None:
    """Keys NeMo 24.05 reads at restore: without ``optim`` the restore fails (Key 'optim' is not in
    struct); without the dropouts NeMo trains with its defaults (0.1), which Llama does not have."""
    if "optim" not in raw:
        report.problems.append("model_config.yaml has no optim section: NeMo 24.05's restore fails "
                               "(Key 'optim' is not in struct); add NeMo's optim defaults")
    dropouts = [k for k in ("hidden_dropout", "attention_dropout", "ffn_dropout")
                if raw.get(k, 0.1) != 0.0]
    if dropouts:
        report.problems.append(
            f"{', '.join(f'{k}={raw.get(k, 0.1)}' for k in dropouts)}"
            f"{' (absent: NeMo default)' if any(k not in raw for k in dropouts) else ''}: "
            "Llama has no dropout; fine-tuning with NeMo would apply it (set them to 0.0)")


def inspect_path(path: str) -> Report:
    from nemo_minitron.convert.io import is_nemo

    if is_nemo(path):
        return inspect_nemo(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return inspect_hf(path)
    from nemo_minitron.errors import CheckpointError

    raise CheckpointError(f"{path}: neither a .nemo (file or extracted directory) nor an HF "
                          "checkpoint directory")
