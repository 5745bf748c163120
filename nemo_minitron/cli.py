"""The ``nemo-minitron`` command.

    nemo-minitron presets
    nemo-minitron configs [prune|finetune|distill|generate|nemo] [--paths]
    nemo-minitron info minitron_4b_width [--tp 4 --pp 2] [--format text|json|hf|nemo]
    nemo-minitron info /path/to/hf_dir_or_config.json_or_model_config.yaml_or.nemo
    nemo-minitron prune --config tiny --model TEACHER --out STUDENT [--overwrite]
                        [key=value ...]
    nemo-minitron finetune --model BASE --data TRAIN.jsonl --out OUT [--config YAML] [key=value ...]
    nemo-minitron finetune --peft lora --model BASE --data TRAIN.jsonl --out OUT.nemo [lora.rank=8 ...]
    nemo-minitron lora merge --model BASE --adapter OUT.lora --out MERGED(.nemo or HF dir)
    nemo-minitron lora export-peft --adapter OUT.lora --out PEFT_DIR [--base-model ID_OR_PATH]
    nemo-minitron distill --teacher T --student S --data DATA --out OUT [--config YAML] [key=value ...]
    nemo-minitron generate --model HF_DIR_OR_NEMO --prompt TEXT [--greedy] [--max-new-tokens N]
                           [key=value ...]
    nemo-minitron generate --model HF_DIR_OR_NEMO --prompts IN.jsonl --out OUT.jsonl
                           [--config YAML] [key=value ...]
    nemo-minitron eval-ppl --model HF_DIR_OR_NEMO --data FILE.txt|FILE.jsonl
                           [window=2048 stride=512 ...]
    nemo-minitron convert hf-to-nemo HF_DIR --out OUT.nemo [--dtype bf16]
                                     [--format torch_dist|legacy] [--tp N --pp M]
                                     [--tokenizer-type ID_OR_PATH] [--overwrite]
    nemo-minitron convert nemo-to-hf IN.nemo --out OUT_DIR [--dtype bf16|fp16|fp32] [--overwrite]
    nemo-minitron inspect PATH (.nemo, extracted .nemo dir or HF dir)
    nemo-minitron verify HF_DIR IN.nemo [--prompts FILE] [--atol 1e-3]
    nemo-minitron eval-harness --model HF_DIR_OR_NEMO --tasks mmlu,hellaswag [--out R.json]
                               [num_fewshot=5 tp=2 ...]
    nemo-minitron serve --model HF_DIR_OR_NEMO [--host 127.0.0.1] [--port 8000] [tp=2 ...]
    nemo-minitron slurm COMMAND [--nodes N --gpus-per-node G --partition P --account A --time T
                        --container IMAGE --mounts SRC:DST,... --after JOBID --dry-run] [-- ARGS]
    nemo-minitron pipeline --teacher HF_DIR_OR_NEMO --workdir DIR --data DATA [--prune-config YAML]
                           [--distill-config YAML] [slurm options] [--dry-run]
    nemo-minitron preprocess --input IN.jsonl --output-prefix PREFIX [--json-keys text]
                             [--tokenizer HF_DIR] [--append-eod] [--workers N] [--overwrite]
    nemo-minitron demo [--workdir demo_out] [--quick] [--keep] [--steps N]

Jobs run the same under python, torchrun and srun (tp=.. pp=.. overrides); only rank 0 prints.
Config precedence: defaults, then --config YAML, then flags and key=value overrides.

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


def cmd_info(args) -> int:
    from nemo_minitron.config import validate_parallel
    from nemo_minitron.config.describe import describe
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


def cmd_configs(args) -> int:
    from nemo_minitron.config.recipe import CONF_DIR, shipped_configs

    if args.kind and not os.path.isdir(os.path.join(CONF_DIR, args.kind)):
        raise MinitronError(f"no configs of kind {args.kind!r} (kinds: "
                            f"{', '.join(sorted(os.listdir(CONF_DIR)))})")
    for key, path in shipped_configs(args.kind).items():
        print(f"{key:48s} {path}" if args.paths else key)
    return 0


def load_recipe(name: str):
    """The recipe module ``nemo_minitron.recipes.<name>`` (shipped in the wheel)."""
    import importlib

    return importlib.import_module(f"nemo_minitron.recipes.{name}")


def cmd_nemo(args) -> int:
    from nemo_minitron.nemo_native.launch import main as nemo_main

    return nemo_main(args.recipe_args)


def cmd_recipe(args) -> int:
    """Commands that are recipes/<name>.py: the recipe parses its own arguments."""
    return load_recipe(args.recipe).main(args.recipe_args)


def _job_values(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) not in (None, False)}


def cmd_generate(args) -> int:
    from nemo_minitron.inference.job import GenerateJobConfig, run_generate
    from nemo_minitron.config.recipe import load_config

    values = _job_values(args, ("model", "prompt", "prompts", "out", "greedy"))
    if args.max_new_tokens is not None:
        values["max_new_tokens"] = args.max_new_tokens
    run_generate(load_config(GenerateJobConfig, args.config, args.overrides, values,
                             kind="generate"))
    return 0


def cmd_eval_ppl(args) -> int:
    from nemo_minitron.inference.job import PerplexityJobConfig, run_perplexity
    from nemo_minitron.config.recipe import load_config

    run_perplexity(load_config(PerplexityJobConfig, args.config, args.overrides,
                               _job_values(args, ("model", "data")), kind="generate"))
    return 0


def cmd_hf_to_nemo(args) -> int:
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    out = hf_to_nemo(args.hf_dir, _convert_out(args), dtype=args.dtype, fmt=args.format,
                     tp=args.tp, pp=args.pp, tokenizer_type=args.tokenizer_type,
                     overwrite=args.overwrite)
    print(f"wrote {out} ({args.format}, {args.dtype}, TP={args.tp} PP={args.pp})")
    return 0


def cmd_nemo_to_hf(args) -> int:
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    out, layout = nemo_to_hf(args.nemo, _convert_out(args), dtype=args.dtype,
                             overwrite=args.overwrite)
    print(f"wrote {out} (from {layout} weights)")
    return 0


def cmd_inspect(args) -> int:
    from nemo_minitron.convert.inspect import inspect_path

    report = inspect_path(args.path)
    print(report.text())
    return 1 if report.problems else 0


def cmd_verify(args) -> int:
    from nemo_minitron.inference.verify import report, verify

    results = verify(args.hf_dir, args.nemo, args.prompts)
    print(report(results, args.atol))
    return 0 if max(r.max_abs_diff for r in results) <= args.atol else 1


def _convert_out(args) -> str:
    """The output of ``convert``: ``--out`` (every command's spelling) or the older positional,
    accepted for existing scripts; exactly one of them."""
    if args.output is not None and args.out is not None:
        raise MinitronError(f"convert {args.direction}: the output is given twice (--out "
                            f"{args.out} and the positional {args.output}); give only --out")
    if args.output is None and args.out is None:
        raise MinitronError(f"convert {args.direction}: no output given: add --out PATH")
    return args.out or args.output


def _add_convert_out(parser, what: str) -> None:
    parser.add_argument("output", nargs="?", default=None,
                        help=f"{what}, as a positional argument (older spelling of --out)")
    parser.add_argument("--out", default=None, help=what)


def add_convert_parsers(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between HF and .nemo")
    conv = p.add_subparsers(dest="direction", metavar="DIRECTION")
    conv.required = True
    h = conv.add_parser("hf-to-nemo", help="HF checkpoint directory -> .nemo")
    h.add_argument("hf_dir", help="HF checkpoint directory (config.json + safetensors)")
    _add_convert_out(h, "the .nemo file to write")
    h.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the stored weights (default bf16)")
    h.add_argument("--format", choices=("torch_dist", "legacy"), default="torch_dist",
                   help="weights layout: distributed checkpoint (default) or legacy .ckpt files")
    h.add_argument("--tp", type=int, default=1, help="tensor parallel size recorded (legacy: "
                   "files per rank)")
    h.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    h.add_argument("--tokenizer-type", default=None,
                   help="tokenizer.type for model_config.yaml: a hub id or path (default: a "
                        "non-gated hub id; the HF tokenizer files are packed either way)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output")
    h.set_defaults(func=cmd_hf_to_nemo, fast_exit=True)
    n = conv.add_parser("nemo-to-hf", help=".nemo (file or extracted dir) -> HF directory")
    n.add_argument("nemo", help=".nemo file or extracted .nemo directory")
    _add_convert_out(n, "the HF checkpoint directory to write")
    n.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="output dtype (default: the stored one)")
    n.add_argument("--overwrite", action="store_true", help="replace an existing output")
    n.set_defaults(func=cmd_nemo_to_hf, fast_exit=True)

    p = sub.add_parser("inspect", help="describe a .nemo or HF checkpoint and diagnose known "
                                       "problems (exit 1 when any is found)")
    p.add_argument("path", help=".nemo file, extracted .nemo directory, or HF directory")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="logits of the .nemo's Megatron model vs transformers on "
                                      "the HF checkpoint (exit 1 past --atol)")
    p.add_argument("hf_dir", help="HF checkpoint directory (the reference, run by transformers)")
    p.add_argument("nemo", help=".nemo file or extracted directory")
    p.add_argument("--prompts", help="JSONL with \"prompt\" or a text file, one prompt per line "
                                     "(default: English prose from Python's documentation)")
    p.add_argument("--atol", type=float, default=1e-3,
                   help="largest acceptable |delta logit| in fp32 (default 1e-3)")
    p.set_defaults(func=cmd_verify)


def cmd_lora(args) -> int:
    from nemo_minitron.peft.adapter_io import export_peft, merge_lora

    if args.action == "merge":
        print(f"wrote {merge_lora(args.model, args.adapter, args.out, overwrite=args.overwrite)}")
    else:
        out = export_peft(args.adapter, args.out, base_model=args.base_model,
                          overwrite=args.overwrite)
        print(f"wrote {out}")
    return 0


def add_lora_parsers(sub) -> None:
    p = sub.add_parser("lora", help="LoRA adapters: merge into the base, export to HF-PEFT")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    m = actions.add_parser("merge", help="base + adapter -> merged model (.nemo or HF dir)")
    m.add_argument("--model", "--base", dest="model", required=True,
                   help="base model: HF directory or .nemo (--base: older spelling)")
    e = actions.add_parser("export-peft", help="adapter -> adapter_config.json + "
                                               "adapter_model.safetensors for peft")
    e.add_argument("--base-model", help="base_model_name_or_path to record: an HF directory or "
                   "hub id (default: the base the adapter was trained on; required when that was "
                   "a .nemo, which transformers cannot load)")
    for q in (m, e):
        q.add_argument("--adapter", required=True, help="adapter directory (finetune --peft lora)")
        q.add_argument("--out", required=True, help="merged model: .nemo or HF directory"
                       if q is m else "PEFT directory to write")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        q.set_defaults(func=cmd_lora)


def cmd_eval_harness(args) -> int:
    from nemo_minitron.config.recipe import load_config
    from nemo_minitron.inference.job import EvalHarnessJobConfig, run_eval_harness

    values = _job_values(args, ("model", "out"))
    if args.tasks:
        values["tasks"] = [t for t in args.tasks.split(",") if t]
    run_eval_harness(load_config(EvalHarnessJobConfig, args.config, args.overrides, values,
                                 kind="generate"))
    return 0


def cmd_serve(args) -> int:
    from nemo_minitron.config.recipe import load_config
    from nemo_minitron.inference.serve import ServeJobConfig, run_serve

    values = _job_values(args, ("model", "host"))
    if args.port is not None:
        values["port"] = args.port
    run_serve(load_config(ServeJobConfig, args.config, args.overrides, values,
                           kind="generate"))
    return 0


def cmd_launch(args) -> int:
    """slurm / pipeline: nemo_minitron.launch parses its own arguments."""
    import importlib

    return importlib.import_module(f"nemo_minitron.launch.{args.launcher}").main(args.recipe_args)


def cmd_preprocess(args) -> int:
    from nemo_minitron.data.preprocess import preprocess

    done = preprocess(args.input, args.output_prefix, args.json_keys, tokenizer=args.tokenizer,
                      append_eod=args.append_eod, workers=args.workers, overwrite=args.overwrite)
    for key, r in done.items():
        print(f"{key}: {r['prefix']}.bin/.idx, {r['documents']} documents, {r['tokens']} tokens "
              f"({r['dtype']}), {r['skipped']} empty skipped, {r['seconds']:.1f}s")
    return 0


def cmd_demo(args) -> int:
    from nemo_minitron.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir=args.workdir, quick=args.quick, keep=args.keep, steps=args.steps))
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

    p = sub.add_parser("configs", help="list the job configs shipped in the package (--config NAME)")
    p.add_argument("kind", nargs="?", help="only these: prune, finetune, distill, generate, nemo")
    p.add_argument("--paths", action="store_true", help="print each config's file path too")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("info", help="describe a preset, HF checkpoint, NeMo config or .nemo file")
    p.add_argument("source", help="preset name, HF dir or config.json, model_config.yaml, or .nemo")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size to validate (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size to validate (default 1)")
    p.add_argument("--format", choices=("text", "json", "hf", "nemo"), default="text",
                   help="text summary, our config as JSON, HF config.json, or NeMo model_config.yaml")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("prune", add_help=False,
                       help="Minitron width/depth pruning of a teacher")
    p.add_argument("recipe_args", nargs=argparse.REMAINDER,
                   help="--config NAME|YAML --model TEACHER --data CALIB --out STUDENT [--overwrite] "
                        "[key=value ...]")
    p.set_defaults(func=cmd_recipe, recipe="prune")

    p = sub.add_parser("finetune", add_help=False,
                       help="full or LoRA SFT")
    p.add_argument("recipe_args", nargs=argparse.REMAINDER,
                   help="--model BASE --data TRAIN.jsonl --out OUT [--config NAME|YAML] [key=value ...]")
    p.set_defaults(func=cmd_recipe, recipe="finetune")

    p = sub.add_parser("distill", add_help=False,
                       help="logit distillation of a student from a frozen teacher")
    p.add_argument("recipe_args", nargs=argparse.REMAINDER,
                   help="--teacher T --student S --data DATA --out OUT [--config NAME|YAML] "
                        "[key=value ...]")
    p.set_defaults(func=cmd_recipe, recipe="distill")

    p = sub.add_parser("nemo", add_help=False,
                       help="run a NeMo script (megatron_gpt_eval.py, ...) with the patches NeMo "
                            "24.05 needs for this family")
    p.add_argument("recipe_args", nargs=argparse.REMAINDER,
                   help="SCRIPT [--overrides FILE] [--dry-run] [hydra key=value ...]")
    p.set_defaults(func=cmd_nemo)

    p = sub.add_parser("generate", help="complete prompts with the Megatron model (KV cache, TP/PP)")
    p.add_argument("--model", help="HF checkpoint directory or .nemo")
    p.add_argument("--prompt", help="one prompt: its completion alone is printed")
    p.add_argument("--prompts", help="JSONL file with a \"prompt\" per line")
    p.add_argument("--out", help="JSONL file for the completions of --prompts")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens",
                   help="tokens to generate per prompt (same as max_new_tokens=N)")
    p.add_argument("--config", help="YAML job config, or a shipped one by name (nemo-minitron "
                                    "configs generate)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="tp, pp, dtype, temperature, top_k, top_p, seed, stop, logprobs, ...")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval-ppl", help="sliding-window perplexity of a text or JSONL file")
    p.add_argument("--model", help="HF checkpoint directory or .nemo")
    p.add_argument("--data", help="text file (one document) or JSONL with a \"text\" per line")
    p.add_argument("--config", help="YAML job config, or a shipped one by name")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="window, stride, batch_size, tp, pp, dtype")
    p.set_defaults(func=cmd_eval_ppl)

    add_convert_parsers(sub)
    add_lora_parsers(sub)
    p = sub.add_parser("eval-harness", help="lm-evaluation-harness tasks (needs pip install lm-eval)")
    p.add_argument("--model", help="HF checkpoint directory or .nemo")
    p.add_argument("--tasks", help="comma-separated lm-eval task names")
    p.add_argument("--out", help="JSON file for lm-eval's full results (same as out=...)")
    p.add_argument("--config", help="YAML job config, or a shipped one by name")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="num_fewshot, limit, batch_size, max_gen_toks, tp, pp, dtype")
    p.set_defaults(func=cmd_eval_harness)

    p = sub.add_parser("serve", help="HTTP completions server (POST /v1/completions, GET /health)")
    p.add_argument("--model", help="HF checkpoint directory or .nemo")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default 8000; 0: any free port)")
    p.add_argument("--config", help="YAML job config, or a shipped one by name")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="tp, pp, dtype, seed, request_timeout_s")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("slurm", add_help=False, help="submit any command above as an sbatch job "
                       "(pyxis container, one task per GPU; nemo_minitron/launch/slurm.py)")
    p.add_argument("recipe_args", nargs=argparse.REMAINDER,
                   help="COMMAND --nodes N --gpus-per-node G ... [--dry-run] [-- ARGS]")
    p.set_defaults(func=cmd_launch, launcher="slurm")
    p = sub.add_parser("pipeline", add_help=False, help="convert -> prune -> distill -> export "
                       "as dependent SLURM jobs (nemo_minitron/launch/pipeline.py)")
    p.add_argument("recipe_args", nargs=argparse.REMAINDER,
                   help="--teacher HF_DIR_OR_NEMO --workdir DIR --data DATA [slurm options] "
                        "[--dry-run]")
    p.set_defaults(func=cmd_launch, launcher="pipeline")
    p = sub.add_parser("preprocess", help="JSONL -> Megatron indexed dataset (.bin/.idx), as NeMo's "
                                          "preprocess_data_for_megatron.py writes it")
    p.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], dest="json_keys",
                   help="fields to write, one dataset each (default: text)")
    p.add_argument("--output-prefix", required=True, dest="output_prefix",
                   help="writes PREFIX_<key>_document.bin/.idx")
    p.add_argument("--tokenizer", help="HF checkpoint dir or tokenizer.json (default: the real "
                                       "Llama-3.1 tokenizer)")
    p.add_argument("--append-eod", action="store_true", dest="append_eod",
                   help="end every document with <|end_of_text|> (as NeMo's flag)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_preprocess)
    from nemo_minitron.demo import add_demo_arguments

    p = sub.add_parser("demo", help="the whole pipeline on the tiny family, on a CPU, in minutes")
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None, fast_exit: Optional[list] = None) -> int:
    from nemo_minitron.compat import quiet_fallback_warnings

    quiet_fallback_warnings()
    parser = build_parser()
    # parse_known_args: recipe commands (prune, finetune, distill) parse their own options
    args, rest = parser.parse_known_args(argv)
    if rest and not hasattr(args, "recipe_args"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if hasattr(args, "recipe_args"):
        args.recipe_args = rest + args.recipe_args
    try:
        from nemo_minitron import lifecycle

        # a process a job started (its .nemo export, a demo stage) dies with that job
        lifecycle.die_with_launcher()
        code = args.func(args)
        if fast_exit is not None and getattr(args, "fast_exit", False):
            fast_exit.append(True)
        return code
    except MinitronError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `nemo-minitron presets | head`
        return 0


def run(argv: Optional[List[str]] = None) -> None:
    """The program (console script, ``python -m``): :func:`main`, then exit. After a conversion the
    process leaves without the interpreter's teardown (``os._exit`` once the output streams are
    flushed): clearing torch's and Megatron's modules takes ~0.6 s on the 2-core VM, and a
    conversion has already closed, renamed or removed everything it wrote (its cleanup is in
    ``finally`` blocks, not at exit). Other commands exit normally (their libraries may flush
    at exit)."""
    fast = []
    code = main(argv, fast)
    if fast:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
