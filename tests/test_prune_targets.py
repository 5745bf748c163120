"""Pruning targets, recipe config precedence and calibration data: every bad input is a clear error
before any model is built (no Megatron here)."""
import json
import math
import os

import pytest

from nemo_minitron.config import get_preset
from nemo_minitron.config.recipe import load_config as load_recipe_config
from nemo_minitron.errors import ConfigError, MinitronError
from nemo_minitron.prune.targets import resolve_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_real_targets_reproduce_the_released_shapes():
    teacher = get_preset("llama31_8b")
    width = resolve_target(teacher, "minitron_4b_width").config
    assert width == get_preset("minitron_4b_width")
    assert width.num_params() == 4_512_746_496  # the 4B-Width model card / FACTS.md §1
    assert width.non_embedding_params() == 3_724_741_632
    explicit = resolve_target(teacher, None, {"hidden_size": 3072, "ffn_hidden_size": 9216})
    assert explicit.config == width and width.head_dim == 128
    depth = resolve_target(teacher, "minitron_4b_depth")
    assert depth.config == get_preset("minitron_4b_depth") and depth.drop_layers is None
    released = resolve_target(teacher, None, {"drop_layers": list(range(16, 32))})
    assert released.config == get_preset("minitron_4b_depth")
    assert released.drop_layers == tuple(range(16, 32))


def test_tiny_targets():
    teacher = get_preset("tiny_llama31")
    assert resolve_target(teacher, "tiny_minitron_width").config == get_preset("tiny_minitron_width")
    assert resolve_target(teacher, "tiny_minitron_depth").config == get_preset("tiny_minitron_depth")
    # no target at all: the teacher's own shape
    assert resolve_target(teacher).config == teacher
    # heads pruned with their groups: 1 group of 2 heads out of 2 groups of 2
    t = resolve_target(teacher, None, {"num_attention_heads": 2, "num_query_groups": 1}).config
    assert (t.num_attention_heads, t.num_query_groups, t.head_dim) == (2, 1, 32)


@pytest.mark.parametrize("target, overrides, tp, message", [
    (None, {"hidden_size": 128}, 1, "target hidden_size=128 is larger than the teacher's 64"),
    (None, {"num_layers": 5}, 1, "num_layers=5 is larger"),
    (None, {"num_attention_heads": 3}, 1, "num_attention_heads=3 is not divisible by "
                                          "num_query_groups=2"),
    (None, {"num_query_groups": 1}, 1, "needs 4 heads per group, more than the teacher's 2"),
    (None, {"ffn_hidden_size": 223}, 2, "target cannot be split by TP=2: ffn_hidden_size=223"),
    (None, {"num_attention_heads": 2, "num_query_groups": 1}, 2, "num_query_groups=1 is not "
                                                                 "divisible by tensor"),
    ("minitron_4b_width", {}, 1, "target=minitron_4b_width is not a pruned shape of this teacher"),
    ("no_such", {}, 1, "unknown preset 'no_such'"),
    (None, {"drop_layers": [4]}, 1, r"drop_layers: \[4\] out of range for 4 layers"),
    (None, {"drop_layers": [1, 1]}, 1, "repeats a layer"),
    (None, {"drop_layers": [0], "num_layers": 2}, 1, "num_layers=2 contradicts drop_layers"),
    (None, {"head_dim": 16}, 1, "unknown pruning target(s) head_dim"),
    (None, {"hidden_size": 0}, 1, "must be a positive integer"),
])
def test_bad_targets(target, overrides, tp, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       if "\\" not in message else message):
        resolve_target(get_preset("tiny_llama31"), target, overrides, tp=tp)


def test_real_bad_targets():
    teacher = get_preset("llama31_8b")
    with pytest.raises(ConfigError, match="ffn_hidden_size=9217 is not divisible by "
                                          "tensor_model_parallel_size=8"):
        resolve_target(teacher, "minitron_4b_width", {"ffn_hidden_size": 9217}, tp=8)
    with pytest.raises(ConfigError, match="is not a pruned shape.*head_dim=32"):
        resolve_target(teacher, "tiny_minitron_width")


def test_config_precedence(tmp_path):
    from nemo_minitron.cli import load_recipe

    PruneConfig = load_recipe("prune").PruneConfig
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("model: /teacher\nout: /student\ncalib_samples: 8\nseq_length: 16\n")
    cfg = load_recipe_config(PruneConfig, str(yaml_file), ["seq_length=32", "drop_layers=[1, 2]"])
    assert (cfg.calib_samples, cfg.seq_length, cfg.drop_layers) == (8, 32, [1, 2])  # yaml, cli
    assert cfg.micro_batch_size == PruneConfig.__dataclass_fields__["micro_batch_size"].default
    yaml_file.write_text("model: /t\nout: /s\ncalib_sample: 8\n")
    with pytest.raises(ConfigError, match="unknown config key.*calib_sample'"):
        load_recipe_config(PruneConfig, str(yaml_file))
    with pytest.raises(ConfigError, match="unknown config key.*hiden_size"):
        load_recipe_config(PruneConfig, None, ["model=a", "out=b", "hiden_size=3"])
    with pytest.raises(ConfigError, match="required key.*model"):
        load_recipe_config(PruneConfig, None, ["out=b"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_recipe_config(PruneConfig, None, ["out"])


def test_calibration_data(tiny_hf_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from nemo_minitron.data.calibration import calibration_samples

    ids = calibration_samples("pydoc", tiny_hf_dir, num_samples=3, seq_length=20)
    assert ids.shape == (3, 21) and ids[0, 0].item() == 128000  # <|begin_of_text|>
    import pydoc_data.topics

    first = pydoc_data.topics.topics[sorted(pydoc_data.topics.topics)[0]]
    text = tokenizers.Tokenizer.from_file(f"{tiny_hf_dir}/tokenizer.json").decode(ids[0, 1:].tolist())
    assert len(text) > 40 and first.startswith(text)  # real prose, in order, from the first topic
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "hello world " * 30}) + "\n\n"
                     + json.dumps({"text": "more"}) + "\n")
    assert calibration_samples(str(jsonl), tiny_hf_dir, 2, 10).shape == (2, 11)
    with pytest.raises(ConfigError, match=r"yields \d samples of seq_length\+1 = 11 tokens.*fewer "
                                          r"than calib_samples=10"):
        calibration_samples(str(jsonl), tiny_hf_dir, 10, 10)
    txt = tmp_path / "c.txt"
    txt.write_text("one paragraph\nstill one\n\nanother\n")
    assert calibration_samples(str(txt), tiny_hf_dir, 1, 4).shape == (1, 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: missing or non-string field\(s\) 'text'"):
        calibration_samples(str(bad), tiny_hf_dir, 1, 4)


def _cli(capsys, *argv):
    from nemo_minitron.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, message", [
    (["calib_samples=100000"], "yields"),
    (["hidden_size=65"], "target hidden_size=65 is larger than the teacher's 64"),
    (["drop_layers=[0, 9]"], "drop_layers: [9] out of range for 4 layers"),
    (["num_attention_heads=3"], "not divisible by num_query_groups=2"),
    (["depth_metric=perplexity"], "depth_metric='perplexity' is not one of loss, cosine"),
    (["tp=2"], "world size 1 is not a multiple of TP*PP = 2*1"),
])
def test_cli_errors_before_forward(capsys, tiny_hf_dir, tmp_path, extra, message):
    if message == "yields":  # the only case that gets as far as tokenizing
        pytest.importorskip("tokenizers")
    code, out, err = _cli(capsys, "prune", "--config", "conf/prune/tiny.yaml", "--model",
                          tiny_hf_dir, "--out", str(tmp_path / "s"), *extra)
    assert code == 2 and message in err and err.startswith("error: ")
    assert "teacher loaded" not in out  # no model was built
    assert not (tmp_path / "s").exists()


def test_existing_output_is_refused_before_any_work(capsys, tiny_hf_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    code, out, err = _cli(capsys, "prune", "--model", tiny_hf_dir, "--out", str(tmp_path / "taken"))
    assert code == 2 and "taken exists; pass --overwrite" in err


@pytest.mark.parametrize("target, drop", [("minitron_4b_width", None),
                                          ("minitron_4b_depth", None),
                                          (None, list(range(16, 32)))])
def test_real_shapes_and_counts_on_meta_tensors(target, drop):
    """The full 8B -> 4B slicing on shape-only (meta) tensors: every student tensor has the
    released checkpoint's shape and the counts are the presets' (8B weights are not needed)."""
    import torch

    from nemo_minitron.config.hf import check_hf_shapes, expected_hf_shapes
    from nemo_minitron.prune.prune import prune_tensors, rankings

    teacher = get_preset("llama31_8b")
    t = resolve_target(teacher, target, {"drop_layers": drop})
    g = torch.Generator().manual_seed(0)
    scores = {"mlp": torch.rand(32, 14336, generator=g), "attn": torch.rand(32, 4096, generator=g),
              "norm": torch.rand(32, 2, 4096, generator=g),
              "layer_cosine": torch.rand(32, generator=g),
              "block_loss": {16: torch.rand(17, generator=g)}}
    plan = rankings(scores, teacher, t)
    shapes = expected_hf_shapes(teacher)
    out = {n: tuple(x.shape) for n, x in prune_tensors(
        lambda n: torch.empty(shapes[n], device="meta"), teacher, t.config, plan)}
    check_hf_shapes(t.config, out)
    want = get_preset(target or "minitron_4b_depth")
    assert t.config == want
    assert sum(math.prod(s) for s in out.values()) == want.num_params()
    assert plan["layers"] == (list(range(16)) if drop else plan["layers"])
    if target == "minitron_4b_width":
        assert sum(math.prod(s) for s in out.values()) == 4_512_746_496  # FACTS.md §1
        assert out["model.layers.0.self_attn.q_proj.weight"] == (4096, 3072)  # 32 x 128 rows


@pytest.mark.parametrize("name, teacher", [("tiny", "tiny_llama31"),
                                           ("minitron_4b_width", "llama31_8b"),
                                           ("minitron_4b_depth", "llama31_8b")])
def test_conf_files(name, teacher):
    from nemo_minitron.cli import load_recipe

    path = os.path.join(ROOT, "nemo_minitron", "conf", "prune", f"{name}.yaml")
    first = open(path).readline()
    assert first.startswith((f"# nemo-minitron prune --config {name} ",
                             f"# torchrun --nproc-per-node 8 recipes/prune.py --config {name} "))
    cfg = load_recipe_config(load_recipe("prune").PruneConfig, name, ["model=m", "out=o"],
                             kind="prune")
    student = resolve_target(get_preset(teacher), cfg.target, tp=8 if teacher != "tiny_llama31"
                             else 1).config
    assert student == get_preset(cfg.target)
