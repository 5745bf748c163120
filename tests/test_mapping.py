"""The HF <-> Megatron weight mapping, checked against transformers' LlamaForCausalLM logits."""
import pytest
import torch

from nemo_minitron.checkpoint.tiny import random_llama_state_dict
from nemo_minitron.config import get_preset
from nemo_minitron.convert import mapping
from nemo_minitron.errors import CheckpointError
from tests.helpers import run_ranks

TOL = 1e-4  # fp32; observed differences are ~1e-6 (reduction order)


def _ids():
    g = torch.Generator().manual_seed(0)
    # positions past the tiny preset's original context (32), so llama3 scaling matters
    return torch.randint(0, 128256, (2, 48), generator=g)


def test_round_trip_is_bit_exact():
    cfg = get_preset("tiny_minitron_width").replace(make_vocab_size_divisible_by=100)
    hf = random_llama_state_dict(cfg, seed=3)
    mcore = dict(mapping.hf_to_megatron(cfg, hf.__getitem__, tp=2))
    assert mcore["embedding.word_embeddings.weight"].shape[0] == cfg.padded_vocab_size(2) == 128400
    back = dict(mapping.megatron_to_hf(cfg, mcore.__getitem__))
    assert list(back) == list(hf)  # HF order
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_qkv_layout_is_per_group():
    cfg = get_preset("tiny_llama31")  # 4 heads, 2 groups, head_dim 32
    hd = cfg.head_dim
    q = torch.arange(4 * hd).float()[:, None].expand(-1, 3)
    k = 1000 + torch.arange(2 * hd).float()[:, None].expand(-1, 3)
    v = 2000 + torch.arange(2 * hd).float()[:, None].expand(-1, 3)
    qkv = mapping.QKV_T.merge(cfg, [q, k, v], 0)[:, 0]
    # group 0: q heads 0,1 then k0 then v0; group 1: q heads 2,3, k1, v1
    expect = torch.cat([q[:2 * hd, 0], k[:hd, 0], v[:hd, 0], q[2 * hd:, 0], k[hd:, 0], v[hd:, 0]])
    assert torch.equal(qkv, expect)


def test_tp_shard_round_trip_and_gated_fc1():
    cfg = get_preset("tiny_llama31")
    full = torch.arange(2 * cfg.ffn_hidden_size * 2).float().reshape(2 * cfg.ffn_hidden_size, 2)
    name = "decoder.layers.3.mlp.linear_fc1.weight"
    shards = [mapping.tp_shard(name, full, r, 2) for r in range(2)]
    gate, up = full.chunk(2)
    assert torch.equal(shards[1], torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    assert torch.equal(mapping.tp_unshard(name, shards), full)
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    w = torch.randn(64, 128)
    assert mapping.tp_shard(proj, w, 1, 2).shape == (64, 64)
    assert torch.equal(mapping.tp_unshard(proj, [mapping.tp_shard(proj, w, r, 2) for r in range(2)]), w)


def test_unmapped_and_missing_names_are_reported():
    cfg = get_preset("tiny_minitron_depth")
    names = set(random_llama_state_dict(cfg))
    names.discard("model.layers.1.mlp.up_proj.weight")
    names.add("model.layers.0.self_attn.rotary_emb.inv_freq")
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight; "
                                              r"not mapped: .*rotary_emb\.inv_freq"):
        mapping.check_hf_names(cfg, names)


def _megatron_logits(rank, hf_dir, cfg, ids):
    """This rank's full-vocab logits (None on non-last pipeline stages)."""
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.model.load import load_hf_into_model

    model = build_gpt_model(cfg, dtype="float32")
    load_hf_into_model(model, cfg, hf_dir)
    model.eval()
    return full_logits(model, ids, cfg.vocab_size)


@pytest.fixture(scope="module")
def hf_fp32(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    path = write_tiny_hf_checkpoint(str(tmp_path_factory.mktemp("m") / "hf"), "tiny_llama31",
                                    seed=1, dtype="float32", tokenizer=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(_ids()).logits
    return path, ref


@pytest.mark.hf
@pytest.mark.megatron
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_megatron_logits_match_transformers(hf_fp32, tp, pp):
    path, ref = hf_fp32
    cfg = get_preset("tiny_llama31").replace(dtype="float32")
    results = run_ranks(_megatron_logits, tp * pp, tp=tp, pp=pp, args=(path, cfg, _ids()))
    logits = [r for r in results if r is not None]
    assert len(logits) == tp  # every TP rank of the last stage has the gathered logits
    for got in logits:
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() < TOL
    assert ref.abs().max().item() > 1.0  # O(1) logits: a mapping error would show


@pytest.mark.hf
@pytest.mark.megatron
def test_wrong_mapping_is_caught(hf_fp32, monkeypatch):
    """Negative control: the same comparison fails when fc1 is stored as [up ; gate]."""
    path, ref = hf_fp32
    monkeypatch.setattr(mapping.GateUp, "merge",
                        lambda self, cfg, t, padded, alloc=None: torch.cat([t[1], t[0]], 0))
    cfg = get_preset("tiny_llama31").replace(dtype="float32")
    [got] = run_ranks(_megatron_logits, 1, args=(path, cfg, _ids()))
    assert (got - ref).abs().max().item() > 100 * TOL
