"""The tiny HF checkpoint factory: laid out like the released repos, loadable by transformers."""
import json
import os

import pytest
import torch

from nemo_minitron.checkpoint.hf_io import read_shapes, read_weight_map
from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
from nemo_minitron.config import get_preset
from nemo_minitron.config.hf import check_hf_shapes, read_hf_config
from nemo_minitron.errors import CheckpointError, MinitronError


def test_layout(tiny_hf_dir):
    files = sorted(os.listdir(tiny_hf_dir))
    assert files == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = read_hf_config(tiny_hf_dir)
    assert cfg == get_preset("tiny_llama31")
    weight_map = read_weight_map(tiny_hf_dir)
    check_hf_shapes(cfg, read_shapes(tiny_hf_dir, weight_map))
    with open(os.path.join(tiny_hf_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    total = sum(os.path.getsize(os.path.join(tiny_hf_dir, s)) for s in set(weight_map.values()))
    assert index["metadata"]["total_size"] == cfg.num_params() * 2  # bf16 bytes, headers excluded
    assert index["metadata"]["total_size"] < total


@pytest.mark.hf
def test_transformers_loads_it(tiny_hf_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    assert model.config.head_dim == 32 and model.config.num_key_value_heads == 2
    state = model.state_dict()
    norm = state["model.layers.0.input_layernorm.weight"]
    assert norm.std() > 0.05  # norms differ from the default init (all ones), so mapping bugs show
    ids = torch.tensor([[128000, 9906, 1917, 0, 5, 77, 1000, 128001]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 30


@pytest.mark.hf
def test_real_tokenizer(tiny_hf_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    assert len(tok) == 128256
    assert tok.bos_token_id == 128000 and tok.eos_token_id == 128001 and tok.pad_token is None
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == 128000 and tok.decode(ids[1:]) == "Hello world"
    # Llama-3.1's special names (the packaged file is Llama-3.2-Vision's: <|step_id|>, <|image|>)
    assert tok.convert_ids_to_tokens([128005, 128009, 128255]) == [
        "<|reserved_special_token_2|>", "<|eot_id|>", "<|reserved_special_token_247|>"]


def test_seeded_and_overwrite_rules(tmp_path, tiny_hf_dir):
    from safetensors.torch import load_file

    out = write_tiny_hf_checkpoint(str(tmp_path / "again"), seed=0, tokenizer=False)
    a = load_file(os.path.join(out, "model-00001-of-00002.safetensors"))
    b = load_file(os.path.join(tiny_hf_dir, "model-00001-of-00002.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MinitronError, match="exists; pass --overwrite"):
        write_tiny_hf_checkpoint(out, seed=1, tokenizer=False)
    assert torch.equal(load_file(os.path.join(out, "model-00001-of-00002.safetensors"))[
        "model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # untouched
    write_tiny_hf_checkpoint(out, seed=1, tokenizer=False, overwrite=True, dtype="fp32")
    assert read_hf_config(out).dtype == "float32"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporaries left


def test_corrupt_checkpoints_are_reported(tmp_path):
    import shutil

    src = write_tiny_hf_checkpoint(str(tmp_path / "ok"), preset="tiny_minitron_depth",
                                   tokenizer=False)
    missing = shutil.copytree(src, tmp_path / "missing")
    os.remove(missing / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard named in"):
        read_weight_map(str(missing))
    lying = shutil.copytree(src, tmp_path / "lying")
    index = json.loads((lying / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="disagrees with the shards.*lm_head.weight"):
        read_weight_map(str(lying))
    truncated = shutil.copytree(src, tmp_path / "truncated")
    shard = truncated / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_weight_map(str(truncated))
