"""The pruned student: identity at the same shape, an independent slicing of the teacher run in
transformers, the tiny 4B-Width preset shape, independence of the parallel layout, re-pruning from
a saved scores file."""
import json
import os

import pytest
import torch

from nemo_minitron.checkpoint.hf_io import iter_tensors
from nemo_minitron.config import get_preset
from nemo_minitron.config.hf import read_hf_config
from tests.helpers import run_ranks
from tests.test_mapping import _megatron_logits

SMALL = ["calib_samples=4", "seq_length=32", "micro_batch_size=2", "dtype=float32"]


def _ids():
    return torch.randint(0, 128256, (2, 40), generator=torch.Generator().manual_seed(5))


def _tensors(path):
    return dict(iter_tensors(path))


def _prune_with_recipe(rank, argv):
    from nemo_minitron.cli import load_recipe

    assert load_recipe("prune").main(argv) == 0


def _identity(rank, teacher_dir, out_dir, ids):
    """Importance pass on random ids, rank, slice to the teacher's own shape, write, reload."""
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.load import load_hf_into_model
    from nemo_minitron.prune.importance import compute_scores
    from nemo_minitron.model.source import ModelSource
    from nemo_minitron.prune.prune import prune_tensors, rankings, write_student
    from nemo_minitron.prune.targets import resolve_target

    source = ModelSource(teacher_dir)
    cfg, reader = source.config, source.hf_getter()
    model = build_gpt_model(cfg, dtype="float32", use_te=False)
    load_hf_into_model(model, cfg, teacher_dir)
    scores = compute_scores(model, cfg, ids[:, :17])
    target = resolve_target(cfg)
    plan = rankings(scores, cfg, target)
    write_student(out_dir, target.config, prune_tensors(reader, cfg, target.config, plan),
                  teacher_dir)
    return (_megatron_logits(rank, teacher_dir, cfg, ids),
            _megatron_logits(rank, out_dir, read_hf_config(out_dir), ids))


@pytest.mark.megatron
def test_same_shape_is_the_identity(tiny_hf_dir, tmp_path):
    out = str(tmp_path / "same")
    [(teacher_logits, student_logits)] = run_ranks(_identity, 1, args=(tiny_hf_dir, out, _ids()))
    teacher, student = _tensors(tiny_hf_dir), _tensors(out)
    assert sorted(student) == sorted(teacher)
    assert all(torch.equal(student[k], teacher[k]) and student[k].dtype == teacher[k].dtype
               for k in teacher)
    assert read_hf_config(out) == read_hf_config(tiny_hf_dir)
    assert torch.equal(student_logits, teacher_logits)


def _slice_teacher(teacher, plan, hd):
    """Plain-torch slicing of the teacher's HF weights by pruning.json (written for this test)."""
    hid = torch.tensor(plan["hidden"])
    out = {"model.embed_tokens.weight": teacher["model.embed_tokens.weight"][:, hid],
           "lm_head.weight": teacher["lm_head.weight"][:, hid],
           "model.norm.weight": teacher["model.norm.weight"][hid]}
    for j, i in enumerate(plan["layers"]):
        t = lambda n: teacher[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        heads = [h * hd + d for h in plan["heads"][str(i)] for d in range(hd)]
        kv = [g * hd + d for g in plan["query_groups"][str(i)] for d in range(hd)]
        ffn = plan["ffn"][str(i)]
        p = f"model.layers.{j}."
        out[p + "self_attn.q_proj.weight"] = t("self_attn.q_proj")[heads][:, hid]
        out[p + "self_attn.k_proj.weight"] = t("self_attn.k_proj")[kv][:, hid]
        out[p + "self_attn.v_proj.weight"] = t("self_attn.v_proj")[kv][:, hid]
        out[p + "self_attn.o_proj.weight"] = t("self_attn.o_proj")[hid][:, heads]
        out[p + "mlp.gate_proj.weight"] = t("mlp.gate_proj")[ffn][:, hid]
        out[p + "mlp.up_proj.weight"] = t("mlp.up_proj")[ffn][:, hid]
        out[p + "mlp.down_proj.weight"] = t("mlp.down_proj")[hid][:, ffn]
        out[p + "input_layernorm.weight"] = t("input_layernorm")[hid]
        out[p + "post_attention_layernorm.weight"] = t("post_attention_layernorm")[hid]
    return out


@pytest.mark.hf
@pytest.mark.megatron
def test_student_equals_transformers_on_sliced_teacher(tiny_fp32_hf_dir, tmp_path):
    """Width (hidden, ffn, heads with their group) and depth (best block by LM loss) at once, the
    importance pass at PP=2 (so ranking also runs on scores assembled across stages); the student's Megatron logits equal transformers' on a plain-torch
    slicing of the teacher by the saved rankings."""
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "student")
    # 1 of 2 query groups, and 1 of the 2 heads inside it
    targets = ["hidden_size=48", "ffn_hidden_size=144", "num_attention_heads=1",
               "num_query_groups=1", "num_layers=3", "pp=2"]
    run_ranks(_prune_with_recipe, 2, pp=2, args=(
        ["--config", "conf/prune/tiny.yaml", "--model", tiny_fp32_hf_dir, "--out", out,
         "target=null", *targets, *SMALL],))
    plan = json.load(open(os.path.join(out, "pruning.json")))
    scores = torch.load(os.path.join(out, "importance.pt"), weights_only=True)
    cfg = read_hf_config(out)
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.num_layers, cfg.head_dim) == (48, 144, 1, 1, 3, 32)
    # the rankings are the top-k of the saved scores
    best = int(torch.argmin(scores["block_loss"][1]))
    assert plan["dropped_layers"] == [best] and len(plan["layers"]) == 3
    hidden = scores["norm"].sum(dim=(0, 1))
    dropped = [c for c in range(64) if c not in plan["hidden"]]
    assert hidden[plan["hidden"]].min() > hidden[dropped].max()
    for i in plan["layers"]:
        ffn, mlp = plan["ffn"][str(i)], scores["mlp"][i]
        assert mlp[ffn].min() > mlp[[c for c in range(224) if c not in ffn]].max()
        head = scores["attn"][i].view(4, 32).norm(dim=1)  # [heads]
        group = head.view(2, 2).norm(dim=1)
        [g] = plan["query_groups"][str(i)]
        assert g == int(group.argmax())
        assert plan["heads"][str(i)] == [2 * g + int(head[2 * g:2 * g + 2].argmax())]
    # the independent check: transformers on the plain-torch slicing
    hf_cfg = transformers.AutoConfig.from_pretrained(tiny_fp32_hf_dir)
    hf_cfg.update(dict(hidden_size=48, intermediate_size=144, num_attention_heads=1,
                       num_key_value_heads=1, num_hidden_layers=3, head_dim=32))
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.load_state_dict(_slice_teacher(_tensors(tiny_fp32_hf_dir), plan, 32), strict=True)
    with torch.no_grad():
        ref = model(_ids()).logits
    [got] = run_ranks(_megatron_logits, 1, args=(out, cfg.replace(dtype="float32"), _ids()))
    assert ref.abs().max() > 1.0 and (got - ref).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def width_student(tiny_hf_dir, tmp_path_factory):
    pytest.importorskip("tokenizers")
    out = str(tmp_path_factory.mktemp("w") / "tiny_width")
    run_ranks(_prune_with_recipe, 1, args=(
        ["--config", "conf/prune/tiny.yaml", "--model", tiny_hf_dir, "--out", out, *SMALL],))
    return out


@pytest.mark.megatron
def test_tiny_width_target_gives_the_tiny_student_preset(width_student, tiny_hf_dir):
    assert read_hf_config(width_student) == get_preset("tiny_minitron_width")
    student = _tensors(width_student)
    assert student["model.embed_tokens.weight"].dtype == torch.bfloat16  # the teacher's storage
    assert sum(t.numel() for t in student.values()) == get_preset("tiny_minitron_width").num_params()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(width_student, name), "rb").read() == \
            open(os.path.join(tiny_hf_dir, name), "rb").read()


@pytest.mark.megatron
def test_student_does_not_depend_on_the_layout(width_student, tiny_hf_dir, tmp_path):
    out = str(tmp_path / "tp2")
    run_ranks(_prune_with_recipe, 2, tp=2, launcher="srun", args=(  # ranks as srun sets them
        ["--config", "conf/prune/tiny.yaml", "--model", tiny_hf_dir, "--out", out, "tp=2",
         *SMALL],))
    a, b = _tensors(width_student), _tensors(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_from_saved_scores(width_student, tiny_hf_dir, tmp_path, capsys):
    """Other targets from the saved scores, no forward pass (no Megatron in this process)."""
    from nemo_minitron.cli import main

    scores = os.path.join(width_student, "importance.pt")
    base = ["prune", "--config", "conf/prune/tiny.yaml", "--model", tiny_hf_dir, f"scores={scores}"]
    same = str(tmp_path / "same")
    assert main(base + ["--out", same]) == 0
    assert "no forward pass" in capsys.readouterr().out
    a, b = _tensors(width_student), _tensors(same)
    assert all(torch.equal(a[k], b[k]) for k in a)
    depth = str(tmp_path / "depth")
    assert main(base + ["--out", depth, "target=tiny_minitron_depth", "depth_metric=cosine"]) == 0
    assert read_hf_config(depth) == get_preset("tiny_minitron_depth")
    cos = torch.load(scores, weights_only=True)["layer_cosine"]
    plan = json.load(open(os.path.join(depth, "pruning.json")))
    assert sorted(cos[plan["layers"]].tolist()) == sorted(cos.tolist())[2:]  # the 2 most important
    assert main(base + ["--out", str(tmp_path / "x"), "target=tiny_minitron_depth"]) == 2
    assert "no LM losses for dropping 2 contiguous layers" in capsys.readouterr().err


@pytest.mark.megatron
def test_nemo_teacher_to_nemo_student(width_student, tiny_hf_dir, tmp_path):
    """A .nemo teacher in, a .nemo student out: the same student as HF in, HF out."""
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    teacher = hf_to_nemo(tiny_hf_dir, str(tmp_path / "teacher.nemo"), progress=False)
    out = str(tmp_path / "student.nemo")
    run_ranks(_prune_with_recipe, 1, args=(
        ["--config", "conf/prune/tiny.yaml", "--model", teacher, "--out", out, *SMALL],))
    assert os.path.isfile(out + ".importance.pt") and os.path.isfile(out + ".pruning.json")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # temporaries removed
    back, _ = nemo_to_hf(out, str(tmp_path / "student_hf"), progress=False)
    a, b = _tensors(width_student), _tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
