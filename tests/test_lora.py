"""LoRA: TP-aware adapters, merge, HF-PEFT export, training through the finetune recipe.

Independent references: the merged weights run through the plain (adapter-free) Megatron model, and
peft's own LoraModel on transformers' LlamaForCausalLM. All comparisons in fp32."""
import json
import os

import pytest
import torch

from nemo_minitron.cli import load_recipe, main as cli_main
from nemo_minitron.errors import ConfigError
from nemo_minitron.train.config import LoRASection
from tests.helpers import run_ranks
from tests.train_helpers import BOS, EOS, VOCAB, preimport, train  # noqa: F401  (warm workers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = LoRASection(rank=4, alpha=8.0)
IDS = torch.tensor([[BOS, 17, 300, 5, 1999, 42, 7, 800, 3, 64, 1000, 11]])
ATOL = 2e-5  # fp32 logits of order 1; different summation orders (TP all-reduce, merged W)


@pytest.fixture(scope="module")
def width_dir(tmp_path_factory):
    """tiny_minitron_width (hidden 48, heads*head_dim 128: the 4B-Width quirk), fp32, vocab 2048."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config import get_preset

    cfg = get_preset("tiny_minitron_width").replace(vocab_size=VOCAB, bos_token_id=BOS,
                                                    eos_token_id=EOS)
    assert cfg.q_size != cfg.hidden_size
    return write_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("w") / "width"), cfg, seed=3,
                                    dtype="float32", tokenizer=False)


def random_adapters(cfg, spec, seed=5):
    """Full adapter tensors with nonzero B (B starts at zero in training, which would hide bugs)."""
    from nemo_minitron.peft import lora

    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(cfg.num_layers):
        for target in lora.resolve_targets(spec.target_modules):
            o, i = lora.full_shape(cfg, target)
            out[lora.adapter_key(layer, target, "a")] = torch.randn(spec.rank, i, generator=g) * 0.1
            out[lora.adapter_key(layer, target, "b")] = torch.randn(o, spec.rank, generator=g) * 0.1
    return out


def _adapter_logits(rank, hf_dir, adapters, spec):
    """Logits of base + adapters at this TP, and the adapters gathered back (rank 0)."""
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.peft import lora
    from nemo_minitron.train.model import build_train_model

    cfg = read_hf_config(hf_dir)
    model = build_train_model(cfg, precision="fp32", hf_dir=hf_dir, use_te=False)
    plain = full_logits(model.eval(), IDS, cfg.vocab_size)
    lora.apply_lora(model, cfg, spec)
    shapes = {f"{t}.{f}": tuple(getattr(a, f"lora_{f}").shape)
              for _, t, a in lora.iter_adapters(model) for f in "ab"}
    zero_b = full_logits(model, IDS, cfg.vocab_size)  # B = 0: the base model exactly
    lora.load_adapters(model, adapters)
    return dict(logits=full_logits(model, IDS, cfg.vocab_size), plain=plain, zero_b=zero_b,
                gathered=lora.gather_adapters(model), shapes=shapes)


def test_bad_target_is_a_config_error_before_training(tmp_path, capsys):
    from nemo_minitron.peft.lora import resolve_targets

    assert resolve_targets(["attention_dense", "linear_qkv"]) == ["linear_qkv", "linear_proj"]
    assert len(resolve_targets(["all"])) == 4
    with pytest.raises(ConfigError, match="lora target 'q_proj' does not exist"):
        resolve_targets(["linear_qkv", "q_proj"])
    data = tmp_path / "t.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n')
    rc = cli_main(["finetune", "--peft", "lora", "--model", str(tmp_path / "no_such_model.nemo"),
                   "--data", str(data), "--out", str(tmp_path / "o"),
                   "lora.target_modules=[linear_qkv,dense_h_to_4h]"])
    assert rc == 2  # before the (missing) base model is even opened
    assert "lora target 'dense_h_to_4h' does not exist" in capsys.readouterr().err
    assert cli_main(["finetune", "--peft", "lora", "--model", "m", "--data", str(data), "--out",
                     str(tmp_path / "o"), "lora.rank=0"]) == 2
    assert "lora.rank=0 must be a positive integer" in capsys.readouterr().err


def test_tp2_equals_tp1_and_projection_width_is_heads_times_head_dim(width_dir):
    from nemo_minitron.config.hf import read_hf_config

    cfg = read_hf_config(width_dir)
    adapters = random_adapters(cfg, SPEC)
    [tp1] = run_ranks(_adapter_logits, args=(width_dir, adapters, SPEC))
    tp2 = run_ranks(_adapter_logits, world_size=2, tp=2, args=(width_dir, adapters, SPEC))
    # the adapters change the output, B = 0 does not
    assert torch.equal(tp1["zero_b"], tp1["plain"])
    assert (tp1["logits"] - tp1["plain"]).abs().max() > 1e-2
    for r in tp2:
        torch.testing.assert_close(r["logits"], tp1["logits"], rtol=0, atol=ATOL)
    # gathering the TP shards gives back exactly what was loaded (fc1's B as [gate ; up])
    assert set(tp2[0]["gathered"]) == set(adapters)
    assert all(torch.equal(tp2[0]["gathered"][k], v) for k, v in adapters.items())
    # PP=2: global layer indices on the second stage; gathered on rank 0 from both stages
    pp2 = run_ranks(_adapter_logits, world_size=2, pp=2, args=(width_dir, adapters, SPEC))
    torch.testing.assert_close(pp2[1]["logits"], tp1["logits"], rtol=0, atol=ATOL)
    assert all(torch.equal(pp2[0]["gathered"][k], v) for k, v in adapters.items())
    # NeMo 24.05's bug: linear_proj's adapter input must be heads*head_dim (128), not hidden (48)
    heads_x_hd = cfg.num_attention_heads * cfg.head_dim
    assert tp1["shapes"]["linear_proj.a"] == (SPEC.rank, heads_x_hd) != (SPEC.rank, cfg.hidden_size)
    assert tp2[0]["shapes"]["linear_proj.a"] == (SPEC.rank, heads_x_hd // 2)
    assert tp1["shapes"]["linear_qkv.b"] == (heads_x_hd + 2 * cfg.num_query_groups * cfg.head_dim,
                                            SPEC.rank)


def _mismatched_config(rank, hf_dir):
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.peft import lora
    from nemo_minitron.train.model import build_train_model

    cfg = read_hf_config(hf_dir)
    model = build_train_model(cfg, precision="fp32", hf_dir=hf_dir, use_te=False)
    # what 24.05 assumed: head size = hidden / heads (here 12, not 32)
    wrong = cfg.replace(head_dim=cfg.hidden_size // cfg.num_attention_heads)
    try:
        lora.apply_lora(model, wrong, LoRASection(target_modules=["linear_proj"], rank=4))
    except ConfigError as e:
        return str(e)
    return None


def test_adapter_widths_are_checked_against_the_config(width_dir):
    [msg] = run_ranks(_mismatched_config, args=(width_dir,))
    # proj's input is heads*head_dim = 128; a config claiming 4*12 = 48 (= hidden) is refused
    assert msg == ("layer 0 self_attention.linear_proj: weight [48, 128] does not match the "
                   "config's [48, 48] at TP=1"), msg


def _plain_logits(rank, hf_dir):
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.train.model import build_train_model

    cfg = read_hf_config(hf_dir)
    model = build_train_model(cfg, precision="fp32", hf_dir=hf_dir)
    return full_logits(model.eval(), IDS, cfg.vocab_size)


def test_merged_model_equals_adapter_model(width_dir, tmp_path):
    """merge_lora writes base + s*B@A (HF dir); the plain model on it gives the adapter logits.
    Also checks the merged weights against W + s*B@A computed here on the HF q/k/v tensors."""
    from nemo_minitron.checkpoint.hf_io import iter_tensors
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.peft.adapter_io import adapter_meta, merge_lora, peft_tensors, save_adapter

    cfg = read_hf_config(width_dir)
    adapters = random_adapters(cfg, SPEC)
    meta = adapter_meta(cfg, SPEC, width_dir)
    adapter_dir = save_adapter(adapters, meta, str(tmp_path / "ad"))
    merged = merge_lora(width_dir, adapter_dir, str(tmp_path / "merged"))
    [ref] = run_ranks(_adapter_logits, args=(width_dir, adapters, SPEC))
    [out] = run_ranks(_plain_logits, args=(merged,))
    torch.testing.assert_close(out, ref["logits"], rtol=0, atol=ATOL)
    base, new = dict(iter_tensors(width_dir)), dict(iter_tensors(merged))
    peft = peft_tensors(cfg, meta, adapters)
    for name in ("model.layers.2.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight"):
        mod = "base_model.model." + name[: -len(".weight")]
        want = base[name] + SPEC.alpha / SPEC.rank * (peft[mod + ".lora_B.weight"]
                                                      @ peft[mod + ".lora_A.weight"])
        torch.testing.assert_close(new[name], want, rtol=0, atol=1e-6)
    assert torch.equal(new["model.norm.weight"], base["model.norm.weight"])
    with pytest.raises(Exception, match="exists; pass --overwrite"):
        merge_lora(width_dir, adapter_dir, merged)


@pytest.mark.slow
def test_lora_cli_merge_to_nemo_and_export_peft(tiny_fp32_hf_dir, tmp_path, capsys):
    """The CLI commands; a .nemo merge reads back (through the converter) as the HF merge.
    (The tiny teacher with its tokenizer: a .nemo packs the tokenizer files.)"""
    from nemo_minitron.checkpoint.hf_io import iter_tensors
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf
    from nemo_minitron.peft.adapter_io import adapter_meta, merge_lora, save_adapter

    cfg = read_hf_config(tiny_fp32_hf_dir)
    ad = save_adapter(random_adapters(cfg, SPEC), adapter_meta(cfg, SPEC, "my/base"),
                      str(tmp_path / "ad"))
    nemo = str(tmp_path / "m.nemo")
    assert cli_main(["lora", "merge", "--base", tiny_fp32_hf_dir, "--adapter", ad,
                     "--out", nemo]) == 0
    assert cli_main(["lora", "export-peft", "--adapter", ad, "--out", str(tmp_path / "p"),
                     "--base-model", "nvidia/Llama-3.1-Minitron-4B-Width-Base"]) == 0
    with open(tmp_path / "p" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == "nvidia/Llama-3.1-Minitron-4B-Width-Base"
    back, _ = nemo_to_hf(nemo, str(tmp_path / "back"), progress=False)
    hf = merge_lora(tiny_fp32_hf_dir, ad, str(tmp_path / "hf"))
    a, b = dict(iter_tensors(back)), dict(iter_tensors(hf))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # not an adapter directory: one line, exit 2
    assert cli_main(["lora", "export-peft", "--adapter", tiny_fp32_hf_dir, "--out",
                     str(tmp_path / "q")]) == 2
    assert "is not a LoRA adapter directory" in capsys.readouterr().err


@pytest.mark.hf
def test_peft_export_on_transformers_gives_the_adapter_logits(width_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.peft.adapter_io import adapter_meta, export_peft, save_adapter

    cfg = read_hf_config(width_dir)
    spec = LoRASection(rank=4, alpha=6.0, target_modules=["attention_qkv", "linear_proj",
                                                          "mlp_fc1", "linear_fc2"])
    adapters = random_adapters(cfg, spec, seed=9)
    adapter_dir = save_adapter(adapters, adapter_meta(cfg, spec, width_dir), str(tmp_path / "ad"))
    out = export_peft(adapter_dir, str(tmp_path / "peft"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 6.0
    assert sorted(conf["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"])
    [ref] = run_ranks(_adapter_logits, args=(width_dir, adapters, spec))
    base = transformers.AutoModelForCausalLM.from_pretrained(width_dir, dtype=torch.float32)
    for path in (out, adapter_dir):  # the adapter directory itself loads in peft too
        model = peft.PeftModel.from_pretrained(base, path).eval()
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=ATOL)
        base = model.unload()
        with torch.no_grad():  # unloaded: the base again
            torch.testing.assert_close(base(input_ids=IDS).logits, ref["plain"], rtol=0, atol=ATOL)


def test_only_adapters_train_and_tp2_matches_tp1(width_dir):
    """Optimizer holds only adapter params; base params never change; losses TP=2 == TP=1."""
    spec = LoRASection(rank=4, alpha=8.0)
    [tp1] = run_ranks(lambda r: train(r, width_dir, steps=4, lr=3e-2, lora=spec))
    tp2 = run_ranks(lambda r: train(r, width_dir, steps=4, lr=3e-2, lora=spec), world_size=2, tp=2)
    for r in [tp1] + tp2:
        assert r["opt_params"] and all(".adapter.lora_" in n for n in r["opt_params"])
        assert len(r["opt_params"]) == 2 * 4 * 4  # A and B x 4 targets x 4 layers
        assert r["changed"] == sorted(n for n in r["opt_params"])  # and every adapter moved
    assert tp1["losses"][-1] < tp1["losses"][0]
    for r in tp2:  # fp32; stated tolerance: 1e-5 relative
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(tp1["losses"]),
                                   rtol=1e-5, atol=0)


@pytest.mark.parametrize("tp", [1, 2])
def test_lora_resume_gives_the_same_losses(width_dir, tmp_path, tp):
    spec = LoRASection(rank=4, alpha=8.0)
    layout = dict(world_size=tp, tp=tp)
    full = run_ranks(lambda r: train(r, width_dir, steps=4, lr=3e-2, lora=spec), **layout)[0]
    ckpt = str(tmp_path / "ckpt")
    first = run_ranks(lambda r: train(r, width_dir, steps=4, lr=3e-2, lora=spec, ckpt_dir=ckpt,
                                      ckpt_every=2, stop_after=2), **layout)[0]
    # the checkpoint holds adapters (and optimizer state), not the base
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(os.path.join(ckpt, "step_000002")).read_metadata()
               .state_dict_metadata)
    model_keys = sorted(k.split(".tp")[0] for k in keys if k.startswith("model."))
    assert model_keys == sorted(f"model.decoder.layers.{m}.adapter.lora_{f}" for f in "ab"
                                for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
                                          "mlp.linear_fc1", "mlp.linear_fc2")), model_keys
    assert not any("embedding" in k or k.endswith(".weight") and "adapter" not in k for k in keys)
    rest = run_ranks(lambda r: train(r, width_dir, steps=4, lr=3e-2, lora=spec, ckpt_dir=ckpt),
                     **layout)[0]
    assert rest["start"] == 2
    assert first["losses"] + rest["losses"] == full["losses"]


def _run_recipe(rank, argv):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return load_recipe("finetune").main(argv)


def test_recipe_lora_learns_and_writes_adapter_and_merged_model(tiny_hf_dir, tmp_path):
    pytest.importorskip("tokenizers", reason="needs the tokenizers library")
    from nemo_minitron.checkpoint.hf_io import iter_tensors
    from nemo_minitron.peft.adapter_io import read_adapter

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in
                            [("Capital of France?", "Paris."), ("2 + 3 =", "5"),
                             ("Opposite of hot?", "Cold."), ("A primary color?", "Blue.")]))
    out = str(tmp_path / "out")
    argv = ["--peft", "lora", "--config", os.path.join(ROOT, "nemo_minitron/conf/finetune/tiny_lora.yaml"),
            "--model", tiny_hf_dir, "--data", str(data), "--out", out, "trainer.max_steps=8",
            "trainer.log_every_n_steps=1",
            "trainer.ckpt_every_n_steps=0", "lora.target_modules=[linear_qkv,linear_fc2]"]
    assert run_ranks(lambda r: _run_recipe(r, argv))[0] == 0
    rows = [line.split(",") for line in open(os.path.join(out + ".ckpt", "logs", "metrics.csv"))]
    losses = [float(r[2]) for r in rows[1:] if r[1] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses
    meta, tensors = read_adapter(out + ".lora")
    assert meta["target_modules"] == ["linear_qkv", "linear_fc2"] and meta["rank"] == 8
    assert meta["base_model"] == tiny_hf_dir
    assert os.path.isfile(os.path.join(out + ".lora", "adapter_model.safetensors"))
    # the merged output differs from the base exactly in the adapted weights
    base, merged = dict(iter_tensors(tiny_hf_dir)), dict(iter_tensors(out))
    changed = sorted({k.split(".", 3)[3] for k in base if not torch.equal(base[k], merged[k])})
    assert changed == ["mlp.down_proj.weight", "self_attn.k_proj.weight",
                       "self_attn.q_proj.weight", "self_attn.v_proj.weight"]


@pytest.mark.parametrize("name", ["minitron_4b_width_lora.yaml", "tiny_lora.yaml"])
def test_shipped_lora_configs_load_and_start_with_their_command(name):
    from nemo_minitron.config.recipe import load_config
    from nemo_minitron.peft.lora import check_spec
    from nemo_minitron.train.config import FinetuneConfig

    path = os.path.join(ROOT, "nemo_minitron", "conf", "finetune", name)
    cfg = load_config(FinetuneConfig, path)
    assert cfg.peft == "lora" and check_spec(cfg.lora) == ["linear_qkv", "linear_proj",
                                                           "linear_fc1", "linear_fc2"]
    with open(path) as f:
        head = f.read(600)
    assert "finetune" in head and f"--config {name[:-5]} " in head
