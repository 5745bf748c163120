"""Shared fixtures. Nothing here touches the network.

The megatron-core 0.7.0 tier (NeMo 24.05's versions) imports transformer_engine unconditionally;
on CPU it gets the import-only stand-in in tests/support/te_stub (never on newer megatron-core,
which would try to use it).
"""
import importlib.metadata
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _mcore_version():
    try:
        text = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:2])


if (_mcore_version() or (1,)) < (0, 8) and importlib.util.find_spec("transformer_engine") is None:
    sys.path.insert(0, os.path.join(HERE, "support", "te_stub"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """The tiny teacher as an HF checkpoint directory laid out like the released repos (bf16)."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    return write_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("hf") / "tiny_llama31"),
                                    preset="tiny_llama31", seed=0)
