#!/usr/bin/env python
"""HF Llama-3.1 / Minitron checkpoint -> .nemo, with the flag names of NeMo's own converter.

    python scripts/convert_hf_to_nemo.py --input_name_or_path HF_DIR --output_path OUT.nemo \\
        [--precision bf16|16|32] [--format torch_dist|legacy] [--tp 1 --pp 1] \\
        [--tokenizer_type ID_OR_PATH] [--overwrite]

Same as ``nemo-minitron convert hf-to-nemo``.
"""
import argparse
import sys

PRECISIONS = {"bf16": "bf16", "bf16-mixed": "bf16", "16": "fp16", "fp16": "fp16", "16-mixed": "fp16",
              "32": "fp32", "fp32": "fp32"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input_name_or_path", required=True, help="HF checkpoint directory")
    p.add_argument("--output_path", required=True, help=".nemo file to write")
    p.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    p.add_argument("--format", default="torch_dist", choices=("torch_dist", "legacy"))
    p.add_argument("--tp", "--tensor_model_parallel_size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline_model_parallel_size", dest="pp", type=int, default=1)
    p.add_argument("--tokenizer_type", "--tokenizer-type", dest="tokenizer_type", default=None)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from nemo_minitron.cli import main as cli

    args = ["convert", "hf-to-nemo", a.input_name_or_path, a.output_path,
            "--dtype", PRECISIONS[a.precision], "--format", a.format, "--tp", str(a.tp),
            "--pp", str(a.pp)]
    if a.tokenizer_type:
        args += ["--tokenizer-type", a.tokenizer_type]
    if a.overwrite:
        args.append("--overwrite")
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
