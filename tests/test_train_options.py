"""Training options beyond the default fp32 / plain-optimizer path: Megatron's distributed optimizer,
full activation recomputation and bf16 parameters, each against the plain run it must reproduce."""
import pytest

from nemo_minitron.train.optim import megatron_optimizer_available
from tests.helpers import run_ranks
from tests.train_helpers import train, write_small_vocab_checkpoint

LAYOUT_TOL = 1e-4  # as in test_train_loop: reduction-order noise is ~2e-6 over 4 fp32 steps


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    return write_small_vocab_checkpoint(str(tmp_path_factory.mktemp("hf") / "tiny_small_vocab"))


@pytest.fixture(scope="module")
def plain_run(tiny_hf_dir):
    return run_ranks(lambda r: train(r, tiny_hf_dir, steps=4))[0]


def test_full_recompute_matches_plain_run(tiny_hf_dir, plain_run):
    # Recomputation reruns each layer's forward during backward: same math, same numbers.
    rec = run_ranks(lambda r: train(r, tiny_hf_dir, steps=4, recompute="full"))[0]
    assert rec["losses"] == pytest.approx(plain_run["losses"], abs=1e-6)
    assert rec["grad_norms"] == pytest.approx(plain_run["grad_norms"], rel=1e-5)


NEEDS_MEGATRON_OPTIMIZER = pytest.mark.skipif(
    not megatron_optimizer_available()[0],
    reason="megatron.core.optimizer needs NVIDIA apex on this megatron-core (the torch fallback "
           "is fp32-only and says so)")


@NEEDS_MEGATRON_OPTIMIZER
def test_distributed_optimizer_dp2_follows_plain_tp1(tiny_hf_dir, plain_run):
    # DP=2 with optimizer states sharded over the two ranks: same global batch, same trajectory.
    results = run_ranks(lambda r: train(r, tiny_hf_dir, steps=4, distributed_opt=True),
                        world_size=2)
    for res in results:
        assert res["losses"] == pytest.approx(plain_run["losses"], abs=LAYOUT_TOL)
        assert res["grad_norms"] == pytest.approx(plain_run["grad_norms"], rel=1e-4)


@NEEDS_MEGATRON_OPTIMIZER
def test_distributed_optimizer_resume_equals_uninterrupted(tiny_hf_dir, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    kw = dict(steps=5, distributed_opt=True)
    full = run_ranks(lambda r: train(r, tiny_hf_dir, **kw), world_size=2)[0]
    run_ranks(lambda r: train(r, tiny_hf_dir, ckpt_dir=ckpt, ckpt_every=2, stop_after=3, **kw),
              world_size=2)
    resumed = run_ranks(lambda r: train(r, tiny_hf_dir, ckpt_dir=ckpt, ckpt_every=2, **kw),
                        world_size=2)[0]
    assert resumed["start"] == 2
    assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=1e-6)


@NEEDS_MEGATRON_OPTIMIZER
def test_bf16_training_tracks_fp32_and_learns(tiny_hf_dir):
    fp32 = run_ranks(lambda r: train(r, tiny_hf_dir, steps=8, lr=1e-2))[0]
    bf16 = run_ranks(lambda r: train(r, tiny_hf_dir, steps=8, lr=1e-2, precision="bf16"))[0]
    # bf16 weights/activations (fp32 master weights in Megatron's optimizer or the fallback):
    # the first loss differs only by bf16 rounding of the same model; the run still learns.
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], abs=0.05)
    assert bf16["losses"][-1] < bf16["losses"][0] - 1.0, bf16["losses"]
    assert abs(bf16["losses"][-1] - fp32["losses"][-1]) < 0.5, (bf16["losses"], fp32["losses"])
