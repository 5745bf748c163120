"""Generate completions with the Megatron-Core model (KV cache, TP/PP), from a YAML job config.

    python recipes/generate.py --config tiny
    torchrun --nproc-per-node 2 recipes/generate.py --config tiny tp=2
    srun --ntasks-per-node 2 python recipes/generate.py --config minitron_4b_width

Config precedence: GenerateJobConfig defaults, then the YAML, then key=value overrides (unknown keys
are errors). With prompt=TEXT rank 0 prints only the completion; with prompts=IN.jsonl it writes
out=OUT.jsonl. The job itself (checks -> setup -> generate -> write -> cleanup) lives in
nemo_minitron.inference.job, shared with `nemo-minitron generate`.
"""
import argparse
import sys

from nemo_minitron.errors import exit_status
from nemo_minitron.inference.job import GenerateJobConfig, run_generate
from nemo_minitron.config.recipe import load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML job config, or a shipped name (nemo-minitron configs "
                                           "generate)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    return exit_status(lambda: run_generate(  # load config; setup, run, write, cleanup
        load_config(GenerateJobConfig, args.config, args.overrides, kind="generate")))


if __name__ == "__main__":
    sys.exit(main())
