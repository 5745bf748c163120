"""The ``nemo-minitron`` command.

    nemo-minitron presets
    nemo-minitron info minitron_4b_width [--tp 4 --pp 2] [--format text|json|hf|nemo]
    nemo-minitron info /path/to/hf_dir_or_config.json_or_model_config.yaml_or.nemo
    nemo-minitron finetune --model BASE --data TRAIN.jsonl --out OUT [--config YAML] [key=value ...]

Errors in the user's input print one line (``error: ...``) and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from nemo_minitron.errors import MinitronError


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def cmd_presets(args) -> int:
    from nemo_minitron.config import DESCRIPTIONS, PRESETS

    rows = [("preset", "layers", "hidden", "ffn", "heads", "groups", "head_dim", "params",
             "description")]
    for name, c in PRESETS.items():
        rows.append((name, str(c.num_layers), str(c.hidden_size), str(c.ffn_hidden_size),
                     str(c.num_attention_heads), str(c.num_query_groups), str(c.head_dim),
                     _fmt_int(c.num_params()), DESCRIPTIONS[name]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(r, widths))) + "  " + r[-1])
    return 0


def describe(cfg, tp: int = 1, pp: int = 1) -> str:
    """Human-readable summary of an architecture at a parallel layout."""
    from nemo_minitron.config import valid_tp_sizes

    rs = cfg.rope_scaling
    rope = (f"llama3 scaling factor {rs.factor:g} (low_freq_factor {rs.low_freq_factor:g}, "
            f"high_freq_factor {rs.high_freq_factor:g}, original context "
            f"{rs.original_max_position_embeddings})" if rs else "no scaling")
    padded = ", ".join(f"TP{t} {cfg.padded_vocab_size(t)}" for t in (1, 2, 4, 8))
    bytes_per = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.dtype]
    lines = [
        f"layers {cfg.num_layers}, hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, "
        f"heads {cfg.num_attention_heads} ({cfg.num_query_groups} query groups, "
        f"{cfg.heads_per_group} heads each), head_dim {cfg.head_dim}",
        f"attention width heads x head_dim = {cfg.q_size} (hidden {cfg.hidden_size}"
        + (", NOT hidden/heads)" if cfg.q_size != cfg.hidden_size else ")"),
        f"vocab {cfg.vocab_size} (padded with divisor {cfg.make_vocab_size_divisible_by}: "
        f"{padded}), {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings",
        f"RoPE theta {cfg.rope_theta:g}, {rope}, max positions {cfg.max_position_embeddings}",
        f"RMSNorm eps {cfg.norm_eps:g}, SwiGLU, no biases, dtype {cfg.dtype}",
        f"parameters {_fmt_int(cfg.num_params())} ({_fmt_int(cfg.non_embedding_params())} "
        f"non-embedding); {cfg.num_params() * bytes_per / 1e9:.2f} GB in {cfg.dtype}",
        f"valid TP sizes: {', '.join(map(str, valid_tp_sizes(cfg)))}; PP must divide "
        f"{cfg.num_layers} layers",
    ]
    if (tp, pp) != (1, 1):
        per_rank = cfg.num_params(tp) / (tp * pp)
        lines.append(f"layout TP={tp} PP={pp}: ok, padded vocab {cfg.padded_vocab_size(tp)}, "
                     f"~{_fmt_int(int(per_rank))} parameters per rank")
    return "\n".join(lines)


def cmd_info(args) -> int:
    from nemo_minitron.config import validate_parallel
    from nemo_minitron.config.hf import to_hf_dict
    from nemo_minitron.config.nemo import dump_yaml, to_nemo_dict
    from nemo_minitron.config.resolve import resolve_config

    cfg, origin = resolve_config(args.source)
    validate_parallel(cfg, args.tp, args.pp)
    if args.format == "json":
        print(json.dumps(cfg.to_dict(), indent=2))
    elif args.format == "hf":
        print(json.dumps(to_hf_dict(cfg), indent=2))
    elif args.format == "nemo":
        print(f"# NeMo model_config.yaml for {origin}; written by:\n"
              f"#   nemo-minitron info {args.source} --format nemo"
              + (f" --tp {args.tp}" if args.tp != 1 else "") + (f" --pp {args.pp}" if args.pp != 1 else ""))
        print(dump_yaml(to_nemo_dict(cfg, tp=args.tp, pp=args.pp)), end="")
    else:
        print(origin)
        print("  " + describe(cfg, args.tp, args.pp).replace("\n", "\n  "))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nemo_minitron import __version__

    parser = argparse.ArgumentParser(
        prog="nemo-minitron",
        description="Llama-3.1-Minitron (and its Llama-3.1-8B teacher) for NeMo / Megatron-Core.")
    parser.add_argument("--version", action="version", version=f"nemo-minitron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("presets", help="list the model presets of the family")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("info", help="describe a preset, HF checkpoint, NeMo config or .nemo file")
    p.add_argument("source", help="preset name, HF dir or config.json, model_config.yaml, or .nemo")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size to validate (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size to validate (default 1)")
    p.add_argument("--format", choices=("text", "json", "hf", "nemo"), default="text",
                   help="text summary, our config as JSON, HF config.json, or NeMo model_config.yaml")
    p.set_defaults(func=cmd_info)

    # Everything after `finetune` goes to the recipe's own parser (see main()); listed for --help.
    sub.add_parser("finetune", add_help=False,
                   help="full SFT (recipes/finetune.py): --model BASE --data TRAIN.jsonl --out OUT "
                        "[--config YAML] [key=value ...]")
    return parser


RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` (recipes are scripts, not a package: torchtune's layout)."""
    import importlib.util

    path = os.path.join(RECIPES_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise MinitronError(f"{path}: recipe not found (recipes/ ships with the source tree)")
    spec = importlib.util.spec_from_file_location(f"nemo_minitron_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["finetune"]:
        try:
            recipe = load_recipe("finetune")
        except MinitronError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return recipe.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MinitronError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `nemo-minitron presets | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
