"""Make the committed golden .nemo fixtures with the real producers (run once; small files).

    # NeMo 24.05's default format, by its producer: megatron-core 0.7.0 zarr strategy, torch 2.3.1
    python3 -m venv /tmp/venv-zarr && /tmp/venv-zarr/bin/pip install torch==2.3.1 \
        megatron-core==0.7.0 "setuptools<81" "zarr<3" "tensorstore<0.1.46" "numpy<2" psutil pyyaml \
        safetensors omegaconf
    PYTHONPATH=. /tmp/venv-zarr/bin/python tests/data/golden/make_golden.py zarr
    # torch_dist by this project's converter on the current stack (read by the megatron-core 0.7 tier)
    PYTHONPATH=. .venv/bin/python tests/data/golden/make_golden.py torch_dist

The model: GOLDEN_CFG (tiny_minitron_depth with a 256-token vocabulary so the files stay ~0.4 MB),
weights random_llama_state_dict(GOLDEN_CFG, seed=GOLDEN_SEED) -- identical on every stack, so a test
recomputes the expected tensors instead of storing them.

zarr_tp1.nemo / zarr_tp2.nemo: a Megatron GPTModel (local spec) at TP=1 / TP=2 filled from the tiny
HF checkpoint, saved the way NeMo 24.05 saves: ``dist_checkpointing.save(model.sharded_state_dict(
prefix="model."), model_weights, ("zarr", 1))``, plus a model_config.yaml, tarred.
"""
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)

from nemo_minitron.config import get_preset  # noqa: E402

GOLDEN_CFG = get_preset("tiny_minitron_depth").replace(vocab_size=256, dtype="bfloat16")
GOLDEN_SEED = 7
TOKENIZER = "nvidia/Llama-3.1-Minitron-4B-Width-Base"


def _hf(tmp):
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    return write_tiny_hf_checkpoint(os.path.join(tmp, "hf"), GOLDEN_CFG, seed=GOLDEN_SEED,
                                    tokenizer=False)


def _zarr_rank(rank, hf_dir, out_dir):
    import torch  # noqa: F401
    from megatron.core import dist_checkpointing

    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.load import load_hf_into_model

    model = build_gpt_model(GOLDEN_CFG, dtype="bfloat16")
    load_hf_into_model(model, GOLDEN_CFG, hf_dir)
    dist_checkpointing.save(model.sharded_state_dict(prefix="model."), out_dir, ("zarr", 1))
    return True


def make_zarr(tp):
    from nemo_minitron.compat.mcore import mcore_version

    from nemo_minitron.config.nemo import dump_yaml, to_nemo_dict
    from nemo_minitron.convert.nemo_file import pack_nemo
    from tests.helpers import run_ranks

    assert mcore_version()[:2] == (0, 7), "the producer is megatron-core 0.7 (24.05)"
    tmp = tempfile.mkdtemp()
    try:
        hf_dir = _hf(tmp)
        tree = os.path.join(tmp, "nemo")
        os.makedirs(os.path.join(tree, "model_weights"))
        run_ranks(_zarr_rank, tp, tp=tp, args=(hf_dir, os.path.join(tree, "model_weights")))
        cfg = to_nemo_dict(GOLDEN_CFG, tp=tp, precision="bf16", dist_ckpt_format="zarr",
                           tokenizer={"library": "huggingface", "type": TOKENIZER, "use_fast": True})
        with open(os.path.join(tree, "model_config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))
        pack_nemo(tree, os.path.join(HERE, f"zarr_tp{tp}.nemo"), overwrite=True)
    finally:
        shutil.rmtree(tmp)


def make_torch_dist():
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    tmp = tempfile.mkdtemp()
    try:
        hf_to_nemo(_hf(tmp), os.path.join(HERE, "torch_dist_tp1.nemo"), dtype="bf16",
                   tokenizer_type=TOKENIZER, overwrite=True)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    if sys.argv[1:] == ["zarr"]:
        if os.path.join(ROOT, "tests", "support", "te_stub") not in sys.path:
            sys.path.insert(0, os.path.join(ROOT, "tests", "support", "te_stub"))
        make_zarr(1)
        make_zarr(2)
    elif sys.argv[1:] == ["torch_dist"]:
        make_torch_dist()
    else:
        sys.exit(__doc__)
