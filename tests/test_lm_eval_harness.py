"""lm-eval end to end: ``lm_eval.simple_evaluate`` with our registered model "nemo_minitron" and
with lm-eval's own "hf" model (transformers) on the same tiny fp32 checkpoint, on two local tasks
(tests/data/lm_eval_tasks: JSON-lines data, no hub): a multiple-choice task (loglikelihood) and a
generation task (generate_until). Every per-sample log-likelihood agrees within 1e-4 (fp32), every
is-greedy flag and generated string is equal, and the metrics are equal exactly."""
import math
import os

import pytest

from tests.helpers import run_ranks

pytestmark = pytest.mark.megatron

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["minitron_mc", "minitron_gen"]
LOGLIK_ABS_TOL = 1e-4  # fp32 sums over a few tokens: Megatron's and transformers' kernels differ


def _evaluate(rank, hf_dir, cache):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nemo_minitron.inference.lm_eval_adapter import harness_lm_class
    from tests.inference_utils import one_thread_per_rank

    one_thread_per_rank()
    os.chdir(ROOT)  # the task YAMLs name their data files relative to the repository
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=cache)
    harness_lm_class()  # registers "nemo_minitron"
    tasks = TaskManager(include_path=os.path.join(ROOT, "tests", "data", "lm_eval_tasks"))
    out = {}
    for name in ("nemo_minitron", "hf"):
        r = lm_eval.simple_evaluate(model=name, model_args=f"pretrained={hf_dir},dtype=float32",
                                    tasks=TASKS, task_manager=tasks, log_samples=True,
                                    batch_size=2, device="cpu")
        out[name] = ({t: {k: v for k, v in r["results"][t].items() if "," in k} for t in TASKS},
                     {t: [(s["doc_id"], s["filtered_resps"]) for s in r["samples"][t]]
                      for t in TASKS})
    return out


def test_simple_evaluate_equals_lm_evals_hf_model(tiny_fp32_hf_dir, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    out = run_ranks(_evaluate, args=(tiny_fp32_hf_dir, str(tmp_path / "datasets")),
                    timeout=300)[0]
    (ours, our_samples), (hf, hf_samples) = out["nemo_minitron"], out["hf"]
    assert ours == hf  # acc, acc_norm, exact_match and their stderr, exactly
    mc = sorted(our_samples["minitron_mc"]), sorted(hf_samples["minitron_mc"])
    assert [d for d, _ in mc[0]] == list(range(6)) == [d for d, _ in mc[1]]
    worst = 0.0
    for (_, mine), (_, theirs) in zip(*mc):  # one (loglikelihood, is_greedy) per choice
        assert len(mine) == len(theirs) >= 2
        for (ll, greedy), (ll_hf, greedy_hf) in zip(mine, theirs):
            assert greedy == greedy_hf and math.isfinite(ll)
            worst = max(worst, abs(ll - ll_hf))
    assert worst < LOGLIK_ABS_TOL, worst
    gen = sorted(our_samples["minitron_gen"]), sorted(hf_samples["minitron_gen"])
    assert len(gen[0]) == 4 and gen[0] == gen[1]  # the same generated strings, cut alike
    assert any(texts[0] for _, texts in gen[0])  # something was generated
