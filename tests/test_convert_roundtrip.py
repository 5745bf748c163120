"""HF -> .nemo -> HF in every layout, bit for bit; the .nemo's config and weight layout; reading the
golden fixtures NeMo 24.05's producer (zarr) and the current stack (torch_dist) wrote."""
import json
import os
import pickle
import shutil
import tarfile

import pytest
import torch

from nemo_minitron.config.nemo import load_yaml
from nemo_minitron.convert.hf_to_nemo import hf_to_nemo
from nemo_minitron.convert.nemo_file import safe_extract
from nemo_minitron.convert.nemo_to_hf import nemo_to_hf
from tests.convert_helpers import (GOLDEN, assert_same_tensors, golden_hf_state, read_hf_dir)

LAYOUTS = [("torch_dist", 1, 1), ("legacy", 1, 1), ("legacy", 2, 1), ("legacy", 1, 2),
           ("legacy", 2, 2)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    return write_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("src") / "hf"),
                                    "tiny_minitron_depth", seed=5)


@pytest.mark.parametrize("fmt, tp, pp", LAYOUTS)
def test_round_trip_bit_identical(hf_dir, tmp_path, fmt, tp, pp):
    nemo = hf_to_nemo(hf_dir, str(tmp_path / "m.nemo"), fmt=fmt, tp=tp, pp=pp)
    out, layout = nemo_to_hf(nemo, str(tmp_path / "back"))
    assert layout.startswith(fmt)
    assert_same_tensors(read_hf_dir(hf_dir), read_hf_dir(out))
    def files(d):
        return sorted(f for f in os.listdir(d) if not f.endswith(".safetensors"))

    assert files(out) == files(hf_dir)
    for name in ("tokenizer.json", "generation_config.json"):
        with open(os.path.join(out, name)) as a, open(os.path.join(hf_dir, name)) as b:
            assert json.load(a) == json.load(b)
    with open(os.path.join(out, "config.json")) as a, open(os.path.join(hf_dir, "config.json")) as b:
        got, want = json.load(a), json.load(b)
    assert got == want and got["head_dim"] == 32 and got["rope_scaling"]["rope_type"] == "llama3"
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no temporaries left


def test_fp32_and_extracted_dir(hf_dir, tmp_path):
    nemo = hf_to_nemo(hf_dir, str(tmp_path / "m.nemo"), dtype="fp32")
    tree = tmp_path / "tree"
    tree.mkdir()
    safe_extract(nemo, str(tree))
    ref = {k: v.float() for k, v in read_hf_dir(hf_dir).items()}
    out, _ = nemo_to_hf(str(tree), str(tmp_path / "back"))
    assert_same_tensors(ref, read_hf_dir(out))  # bf16 -> fp32 is exact; stored dtype kept
    out, _ = nemo_to_hf(str(tree), str(tmp_path / "bf"), dtype="bf16")
    assert_same_tensors(read_hf_dir(hf_dir), read_hf_dir(out))


def test_gzipped_nemo(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    safe_extract(os.path.join(GOLDEN, "zarr_tp1.nemo"), str(tree))
    gz = tmp_path / "m.nemo"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(str(tree), arcname=".")
    out, _ = nemo_to_hf(str(gz), str(tmp_path / "back"))
    assert_same_tensors(golden_hf_state(), read_hf_dir(out))


def test_model_config_yaml(hf_dir, tmp_path):
    nemo = hf_to_nemo(hf_dir, str(tmp_path / "m.nemo"), tp=2)
    tree = tmp_path / "t"
    tree.mkdir()
    safe_extract(nemo, str(tree))
    c = load_yaml(str(tree / "model_config.yaml"))
    assert c["kv_channels"] == 32 and c["hidden_size"] == 64 and c["num_query_groups"] == 2
    assert c["scale_positional_embedding"] is True and "seq_len_interpolation_factor" not in c
    assert c["precision"] == "bf16" and c["tensor_model_parallel_size"] == 2
    for tp in (1, 2, 4, 8):  # padded vocab stays 128256
        m = c["make_vocab_size_divisible_by"] * tp
        assert -(-128256 // m) * m == 128256
    assert c["tokenizer"]["type"] == "nvidia/Llama-3.1-Minitron-4B-Width-Base"  # not gated
    assert (tree / "tokenizer" / "tokenizer.json").is_file()
    meta = json.loads((tree / "model_weights" / "metadata.json").read_text())
    assert meta == {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                    "common_backend": "torch", "common_backend_version": 1}
    with open(tree / "model_weights" / ".metadata", "rb") as f:
        md = pickle.load(f)
    assert "storage_meta" not in md.__dict__  # torch 2.3 cannot unpickle StorageMeta
    sizes = {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    assert sizes["model.decoder.layers.self_attention.linear_qkv.weight"] == (2, (4 + 2 * 2) * 32, 64)
    assert sizes["model.decoder.layers.mlp.linear_fc1.weight"] == (2, 2 * 224, 64)
    assert sizes["model.embedding.word_embeddings.weight"] == (128256, 64)
    assert "model.decoder.layers.mlp.linear_fc2._extra_state/shard_1_2" in md.state_dict_metadata


def test_tokenizer_type_reference(hf_dir, tmp_path):
    nemo = hf_to_nemo(hf_dir, str(tmp_path / "m.nemo"), tokenizer_type="/models/llama3_tok")
    tree = tmp_path / "t"
    tree.mkdir()
    safe_extract(nemo, str(tree))
    assert load_yaml(str(tree / "model_config.yaml"))["tokenizer"]["type"] == "/models/llama3_tok"


@pytest.mark.parametrize("name", ["zarr_tp1.nemo", "zarr_tp2.nemo", "torch_dist_tp1.nemo"])
def test_golden_fixtures_to_hf(tmp_path, name):
    """zarr: written by megatron-core 0.7.0 (NeMo 24.05's producer) at TP=1/TP=2; torch_dist:
    written by this converter on the current stack."""
    out, layout = nemo_to_hf(os.path.join(GOLDEN, name), str(tmp_path / "hf"))
    assert layout == name.split("_tp")[0]
    assert_same_tensors(golden_hf_state(), read_hf_dir(out))


def test_legacy_model_module_prefix_and_padded_vocab(tmp_path):
    """Legacy files as NeMo writes them under O2 (``model.module.``), vocab padded past the
    tokenizer's: read back, padding sliced off."""
    src = tmp_path / "tree"
    src.mkdir()
    safe_extract(os.path.join(GOLDEN, "torch_dist_tp1.nemo"), str(src))
    out, _ = nemo_to_hf(str(src), str(tmp_path / "hf"))
    hf_to_nemo(out, str(tmp_path / "l.nemo"), fmt="legacy", tokenizer_type="x")
    tree = tmp_path / "l"
    tree.mkdir()
    safe_extract(str(tmp_path / "l.nemo"), str(tree))
    state = torch.load(tree / "model_weights.ckpt", weights_only=True)
    renamed = {}
    for k, v in state.items():
        if k.endswith(("word_embeddings.weight", "output_layer.weight")):
            v = torch.cat([v, torch.randn(100, v.shape[1]).to(v.dtype)])
        renamed["model.module." + k[len("model."):]] = v
    torch.save(renamed, tree / "model_weights.ckpt")
    back, _ = nemo_to_hf(str(tree), str(tmp_path / "back"))
    assert_same_tensors(golden_hf_state(), read_hf_dir(back))
    shutil.rmtree(tree)


def test_torch_dist_export_in_the_stored_and_another_dtype(hf_dir, tmp_path):
    """nemo-to-hf of torch_dist weights: bit-identical in the stored dtype, exact in fp32."""
    nemo = hf_to_nemo(hf_dir, str(tmp_path / "m.nemo"))
    out, _ = nemo_to_hf(nemo, str(tmp_path / "back"))
    assert_same_tensors(read_hf_dir(hf_dir), read_hf_dir(out))
    out, _ = nemo_to_hf(nemo, str(tmp_path / "fp32"), dtype="fp32")
    assert_same_tensors({k: v.float() for k, v in read_hf_dir(hf_dir).items()}, read_hf_dir(out))
