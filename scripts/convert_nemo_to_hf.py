#!/usr/bin/env python
""".nemo (torch_dist, zarr or legacy weights; tar, tar.gz or extracted) -> HF directory, with the
flag names of NeMo's own converter.

    python scripts/convert_nemo_to_hf.py --input_name_or_path IN.nemo --output_path OUT_DIR \\
        [--precision bf16|16|32] [--overwrite]

Same as ``nemo-minitron convert nemo-to-hf``.
"""
import argparse
import sys

PRECISIONS = {"bf16": "bf16", "bf16-mixed": "bf16", "16": "fp16", "fp16": "fp16", "16-mixed": "fp16",
              "32": "fp32", "fp32": "fp32"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input_name_or_path", required=True, help=".nemo file or extracted directory")
    p.add_argument("--output_path", required=True, help="HF directory to write")
    p.add_argument("--precision", default=None, choices=sorted(PRECISIONS),
                   help="output dtype (default: the stored one)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from nemo_minitron.cli import main as cli

    args = ["convert", "nemo-to-hf", a.input_name_or_path, a.output_path]
    if a.precision:
        args += ["--dtype", PRECISIONS[a.precision]]
    if a.overwrite:
        args.append("--overwrite")
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
