"""Shared pieces of the conversion tests: the golden fixtures' model and reading safetensors dirs."""
import glob
import os

import torch

from nemo_minitron.checkpoint.tiny import random_llama_state_dict
from nemo_minitron.config import get_preset

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")
# Must equal tests/data/golden/make_golden.py's GOLDEN_CFG / GOLDEN_SEED (the files were made with it)
GOLDEN_CFG = get_preset("tiny_minitron_depth").replace(vocab_size=256, dtype="bfloat16")
GOLDEN_SEED = 7


def golden_hf_state(dtype=torch.bfloat16):
    """The golden fixtures' weights, recomputed (random_llama_state_dict is stack-independent)."""
    return {k: v.to(dtype) for k, v in random_llama_state_dict(GOLDEN_CFG, GOLDEN_SEED).items()}


def read_hf_dir(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad[:5]}"
