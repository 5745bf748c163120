"""Teacher correction (the finetune recipe on pretraining-style text) and the documented tiny
pipeline correct -> prune -> distill -> export of docs/minitron_pipeline.md, run from the doc's own
text so the doc cannot drift. Needs the real Llama-3 tokenizer (skips on the NeMo 24.05 tier)."""
import csv
import os
import re
import shlex

import pytest

from nemo_minitron.cli import load_recipe, main as cli_main
from nemo_minitron.config.recipe import load_config
from nemo_minitron.train.config import FinetuneConfig
from tests.helpers import run_ranks
from tests.train_helpers import preimport  # noqa: F401  (warm forked workers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "minitron_pipeline.md")
TC = {name: os.path.join(ROOT, "nemo_minitron", "conf", "distill", f"teacher_correction_{name}.yaml")
      for name in ("llama31_8b", "tiny")}


@pytest.mark.parametrize("name", sorted(TC))
def test_teacher_correction_configs_are_finetune_configs_on_text(name):
    cfg = load_config(FinetuneConfig, TC[name])
    assert cfg.data.format == "text" and cfg.data.val_samples > 0
    with open(TC[name]) as f:
        head = f.read(800)
    assert "finetune" in head and re.search(rf"--config teacher_correction_{name}\b", head)
    if name == "llama31_8b":  # shared/FACTS.md section 5: LR 1e-4 -> 1e-5 cosine, warmup ~100
        assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (1e-4, 1e-5, 100)


def _finetune(rank, argv):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # the recipe sets up Megatron itself
    recipe = load_recipe("finetune")
    state = recipe.run(recipe.load_recipe_config(TC["tiny"], argv))
    return state.val_loss, [m["loss"] for m in state.history]


@pytest.mark.slow  # ~20 s on 2 shared cores: two recipe runs on the real tokenizer
def test_teacher_correction_lowers_held_out_lm_loss(tiny_hf_dir, tmp_path):
    pytest.importorskip("tokenizers", reason="the NeMo 24.05 venv has no tokenizers")
    # pydoc text: 40 samples of 64 positions, the last 8 held out (never trained on)
    common = [f"model.restore_from_path={tiny_hf_dir}", "data.train_ds.file_path=pydoc",
              "data.train_ds.max_num_samples=32", "data.val_samples=8", "trainer.progress_bar=false"]
    before, _ = run_ranks(lambda r: _finetune(r, common + [f"out={tmp_path / 'o0'}",
                                                           "trainer.max_steps=0"]))[0]
    after, hist = run_ranks(lambda r: _finetune(r, common + [f"out={tmp_path / 'o'}",
                                                             "trainer.max_steps=6"]))[0]
    # the random tiny teacher starts near ln(128256) = 11.76; six steps on the training text lower
    # the held-out LM loss (measured 12.21 -> 11.46; a run that does not learn stays within ~0.01)
    assert after < before - 0.3, (before, after)
    assert hist[-1] < hist[0]
    assert os.path.isfile(tmp_path / "o" / "config.json")


def tiny_pipeline_commands():
    """The commands of the doc's ``<!-- tiny-pipeline -->`` block, one argv list each."""
    with open(DOC) as f:
        text = f.read()
    m = re.search(r"<!-- tiny-pipeline -->\s*```bash\n(.*?)```\s*<!-- /tiny-pipeline -->", text,
                  re.S)
    assert m, f"{DOC}: no tiny-pipeline block"
    lines = [ln for ln in m.group(1).replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    return [shlex.split(ln) for ln in lines]


# fewer steps than the doc (its configs train 20 and 50 steps, ~2 s each on a shared CPU)
SHORT = {"finetune": ["trainer.max_steps=3", "data.train_ds.max_num_samples=24",
                      "data.val_samples=4", "trainer.progress_bar=false"],
         "distill": ["trainer.max_steps=2", "data.train_ds.max_num_samples=16",
                     "data.val_samples=4", "trainer.progress_bar=false"]}


def _command(rank, argv):
    if argv[0] == "python":
        assert argv[1] == "-c"
        exec(compile(argv[2], "<doc>", "exec"), {})
        return 0
    from megatron.core import parallel_state

    assert argv[0] == "nemo-minitron"
    if argv[1] in ("finetune", "prune", "distill"):
        parallel_state.destroy_model_parallel()  # these jobs set up Megatron themselves
    return cli_main(argv[1:] + SHORT.get(argv[1], []))


@pytest.mark.slow  # ~65 s on 2 shared cores: six jobs, each in a forked worker
def test_documented_tiny_pipeline_runs(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers", reason="the NeMo 24.05 venv has no tokenizers")
    pytest.importorskip("transformers")  # the verify step
    commands = tiny_pipeline_commands()
    assert [c[1] if c[0] == "nemo-minitron" else c[0] for c in commands] == \
        ["python", "finetune", "prune", "distill", "convert", "verify"]
    monkeypatch.chdir(tmp_path)  # the doc runs from the repository root: give it conf/
    os.symlink(os.path.join(ROOT, "nemo_minitron", "conf"), tmp_path / "conf")
    for argv in commands:
        assert run_ranks(lambda r: _command(r, argv), timeout=300)[0] == 0, argv
    tiny = tmp_path / "tiny"
    for out in ("teacher", "teacher_corrected", "student", "student_distilled"):
        assert (tiny / out / "config.json").is_file(), out
    assert (tiny / "student_distilled.nemo").is_file()
    with open(tiny / "student_distilled.ckpt" / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows].count("val") == 1 and float(rows[-1]["kl"]) > 0
