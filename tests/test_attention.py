"""The SDPA core attention (nemo_minitron/model/attention.py) against Megatron's
DotProductAttention: module outputs and q/k/v gradients (GQA, causal and packed block-diagonal
masks, and packed rows as segment ids without a mask), KV-cache shapes, greedy generation, and the whole tiny model's loss and parameter
gradients at TP=1 and TP=2, within 1e-5 in fp32."""
import pytest
import torch

from nemo_minitron.errors import ConfigError
from nemo_minitron.model.attention import resolve_attention_backend
from nemo_minitron.data.training import SFTData
from tests.helpers import run_ranks
from tests.train_helpers import EOS, synthetic_samples, write_small_vocab_checkpoint

TOL = 1e-5


def transformer_config(heads, groups, head_dim):
    """A one-layer fp32 TransformerConfig for the attention modules alone (no fused kernels)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0,
                             hidden_dropout=0.0, masked_softmax_fusion=False,
                             bias_dropout_fusion=False, apply_rope_fusion=False)


def _attention_pair(rank, heads, groups, seq, batch, mask_kind):
    """Both modules on this rank's heads of one random q/k/v (the same on every rank): max
    differences of the output and the q/k/v gradients."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_minitron.model.attention import SDPAttention
    from nemo_minitron.data.packing import SegmentMask
    from nemo_minitron.data.training import attention_mask

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    hn = 8
    config = transformer_config(heads, groups, hn)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, batch, heads, hn, generator=g)
    k = torch.randn(seq, batch, groups, hn, generator=g)
    v = torch.randn(seq, batch, groups, hn, generator=g)
    grad_out = torch.randn(seq, batch, heads * hn, generator=g)
    # this TP rank's heads: query heads [r*heads/tp, ...), their groups [r*groups/tp, ...)
    q = q[:, :, r * heads // tp:(r + 1) * heads // tp]
    k = k[:, :, r * groups // tp:(r + 1) * groups // tp]
    v = v[:, :, r * groups // tp:(r + 1) * groups // tp]
    grad_out = grad_out.view(seq, batch, heads, hn)[:, :, r * heads // tp:(r + 1) * heads // tp]
    grad_out = grad_out.reshape(seq, batch, -1)
    masks = {"megatron": None, "sdpa": None}
    if mask_kind != "causal":  # two samples and a padding tail per row; rows split differently
        seg = torch.tensor([[0] * (seq // 2) + [1] * (seq // 2 - 2) + [-1, -1],
                            [0] * 3 + [1] * (seq - 5) + [2] * 2][:batch])
        # Megatron always gets the dense [b, 1, s, s] mask; SDPA the dense one ("packed", the
        # fallback) or the segment ids alone ("segments", one attention per sample)
        masks = dict(megatron=attention_mask(seg),
                     sdpa=SegmentMask(seg) if mask_kind == "segments" else attention_mask(seg))
        if mask_kind == "broken":  # negative control: segments ignored (causal only)
            masks["sdpa"] = SegmentMask(torch.zeros_like(seg))
    out = {}
    for name, cls in (("megatron", DotProductAttention), ("sdpa", SDPAttention)):
        module = cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                     attention_type="self")
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        o = module(qq, kk, vv, masks[name])
        o.backward(grad_out)
        out[name] = (o.detach(), qq.grad, kk.grad, vv.grad)
    return [float((a - b).abs().max()) for a, b in zip(out["megatron"], out["sdpa"])]


@pytest.mark.parametrize("mask_kind", ["causal", "packed", "segments"])
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_sdpa_module_equals_dot_product_attention(tp, mask_kind):
    # 8 query heads in 4 groups (GQA, 2 per group), per TP rank 4 heads in 2 groups
    for diffs in run_ranks(lambda r: _attention_pair(r, 8, 4, 16, 2, mask_kind),
                           world_size=tp, tp=tp):
        assert max(diffs) < TOL, diffs  # out, dq, dk, dv


def test_segments_that_ignore_the_samples_differ():
    """The comparison above can fail: segment ids that put the whole row in one sample."""
    diffs = run_ranks(lambda r: _attention_pair(r, 8, 4, 16, 2, "broken"))[0]
    assert max(diffs) > 1e-2, diffs


def test_segment_mask_rejects_a_split_sample():
    from nemo_minitron.data.packing import SegmentMask

    with pytest.raises(ConfigError, match="segment 0 is not contiguous"):
        SegmentMask(torch.tensor([[0, 0, 1, 0, -1]])).runs()
    assert SegmentMask(torch.tensor([[0, 0, 1, -1, -1]])).runs() == [
        [(0, 2, False), (2, 3, False), (3, 5, True)]]


def _kv_cache_shapes(rank):
    """A 3-token chunk against 7 cached keys (bottom-right causal) and a 1-token decode step,
    each against an explicit reference."""
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_minitron.model.attention import SDPAttention

    att = SDPAttention(transformer_config(4, 2, 8), 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(7, 1, 2, 8, generator=g), torch.randn(7, 1, 2, 8, generator=g)
    res = []
    for sq in (3, 1):
        q = torch.randn(sq, 1, 4, 8, generator=g)
        kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # [7, 1, 4, 8]
        scores = torch.einsum("qbhd,kbhd->bhqk", q, kk) / 8 ** 0.5
        qpos = torch.arange(7 - sq, 7)[:, None]
        scores = scores.masked_fill(torch.arange(7)[None, :] > qpos, float("-inf"))
        ref = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), vv).reshape(sq, 1, 32)
        res.append(float((att(q, k, v, None) - ref).abs().max()))
    return res


def test_sdpa_kv_cache_chunk_and_decode_step():
    assert max(run_ranks(_kv_cache_shapes)[0]) < TOL


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return write_small_vocab_checkpoint(str(tmp_path_factory.mktemp("hf") / "small"))


def _model_loss_and_grads(rank, hf_dir, backend, packed):
    """Loss and every parameter's gradient of the tiny model on one micro batch of 4 rows."""
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.data.packing import SegmentMask
    from nemo_minitron.model.attention import attention_mask_for
    from nemo_minitron.train.model import build_train_model

    cfg = read_hf_config(hf_dir)
    model = build_train_model(cfg, precision="fp32", hf_dir=hf_dir, attention_backend=backend)
    cores = {type(m.self_attention.core_attention).__name__ for m in model.decoder.layers}
    data = SFTData(synthetic_samples(8), 48, EOS, packed=packed, shuffle=False)
    b = data.rows_to_micro_batches(list(range(min(4, len(data)))), 4)[0]
    assert isinstance(b["attention_mask"], SegmentMask) if packed else b["attention_mask"] is None
    mask = attention_mask_for(model, b["attention_mask"])
    # packed: segment ids for the SDPA model, the dense [b, 1, s, s] fallback for Megatron's
    assert packed is False or isinstance(mask, SegmentMask) == (backend == "sdpa")
    per_token = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                      attention_mask=mask, labels=b["labels"])
    loss = (per_token * b["loss_mask"]).sum() / b["loss_mask"].sum()
    loss.backward()
    return cores, float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_sdpa_model_equals_megatron_attention(small_hf, tp, packed):
    ref, new = [run_ranks(lambda r: _model_loss_and_grads(r, small_hf, backend, packed),
                          world_size=tp, tp=tp) for backend in ("megatron", "sdpa")]
    for (c_ref, l_ref, g_ref), (c_new, l_new, g_new) in zip(ref, new):
        assert c_ref == {"DotProductAttention"} and c_new == {"SDPAttention"}
        assert l_new == pytest.approx(l_ref, abs=TOL)
        assert g_new.keys() == g_ref.keys()
        for name in g_ref:
            assert torch.allclose(g_new[name], g_ref[name], atol=TOL, rtol=1e-4), name


def test_backend_choice():
    assert resolve_attention_backend("megatron", use_te=False) == "megatron"
    assert resolve_attention_backend("sdpa", use_te=False) == "sdpa"
    auto = resolve_attention_backend("auto", use_te=False)
    assert auto == ("sdpa" if torch.cuda.is_available() else "megatron")
    assert resolve_attention_backend("auto", use_te=True) == "te"
    with pytest.raises(ConfigError, match="attention_backend='flash'"):
        resolve_attention_backend("flash", use_te=False)
    with pytest.raises(ConfigError, match="Transformer Engine spec is in use"):
        resolve_attention_backend("sdpa", use_te=True)


def _generate_with(rank, backend):
    """Greedy KV-cache generation (prefill, then one token a step) of a seeded random model."""
    from nemo_minitron.config import get_preset
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.inference.sampling import SamplingParams
    from nemo_minitron.model.build import build_gpt_model
    from tests.inference_utils import set_layout_independent_weights

    cfg = get_preset("tiny_llama31").replace(vocab_size=500, bos_token_id=1, eos_token_id=2)
    model = build_gpt_model(cfg, dtype="float32", use_te=False, attention_backend=backend)
    set_layout_independent_weights(model, cfg, 0)
    out = generate(ModelRunner(model, cfg), [[1, 17, 42, 99, 7], [1, 5, 6]],
                   SamplingParams(greedy=True, max_new_tokens=8, logprobs=True, ignore_eos=True))
    return [(list(c.tokens), list(c.logprobs)) for c in out]


def test_sdpa_generation_equals_megatron_attention():
    ref, new = [run_ranks(lambda r: _generate_with(r, b))[0] for b in ("megatron", "sdpa")]
    for (t_ref, lp_ref), (t_new, lp_new) in zip(ref, new):
        assert t_new == t_ref
        assert lp_new == pytest.approx(lp_ref, abs=1e-4)
