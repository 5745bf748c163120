"""Importance scores of the Megatron hook pass against a reference computed directly from hooked
activations of the transformers model on the same batch (tiny, fp32), at several TP/PP/DP layouts;
LM losses with a contiguous block dropped against transformers with those layers removed."""
import pytest
import torch

from nemo_minitron.config import get_preset
from tests.helpers import run_ranks

CFG = get_preset("tiny_llama31").replace(dtype="float32")
BLOCK = 2  # drop 2 of the 4 layers: blocks 0-1, 1-2, 2-3


def _samples():
    """Real text when the tokenizers package is there; random ids otherwise (NeMo 24.05 tier)."""
    g = torch.Generator().manual_seed(0)
    # 6 samples of 48+1 tokens: positions past the tiny original RoPE context (32)
    return torch.randint(0, CFG.vocab_size, (6, 49), generator=g)


def _text_samples(hf_dir):
    pytest.importorskip("tokenizers")
    from nemo_minitron.data.calibration import calibration_samples

    return calibration_samples("pydoc", hf_dir, num_samples=6, seq_length=48)


def _megatron_scores(rank, hf_dir, cfg, samples, block_lengths):
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.load import load_hf_into_model
    from nemo_minitron.prune.importance import compute_scores

    model = build_gpt_model(cfg, dtype="float32", use_te=False)
    load_hf_into_model(model, cfg, hf_dir)
    return compute_scores(model, cfg, samples, micro_batch_size=2, block_lengths=block_lengths)


def _hf_reference(hf_dir, samples):
    """Scores from the transformers model, written from the definition: per hooked activation
    [batch, seq, channels], mean |a| over seq, then L2 over the batch; fp32."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    acts = {}

    def keep(key, which):
        def hook(module, args, output):
            acts.setdefault(key, []).append((args[0] if which == "in" else output).detach())
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(keep(("mlp", i), "in"))
        layer.self_attn.o_proj.register_forward_hook(keep(("attn", i), "in"))
        layer.input_layernorm.register_forward_hook(keep(("norm0", i), "out"))
        layer.post_attention_layernorm.register_forward_hook(keep(("norm1", i), "out"))
        layer.register_forward_hook(
            lambda m, a, kw, out, i=i: acts.setdefault(("cos", i), []).append(
                1 - torch.nn.functional.cosine_similarity(
                    kw.get("hidden_states", a[0] if a else None), out[0] if isinstance(out, tuple)
                    else out, dim=-1)), with_kwargs=True)
    with torch.no_grad():
        model(samples[:, :-1])

    def score(key):
        a = acts[key][0]  # [batch, seq, channels]
        return a.abs().mean(dim=1).norm(dim=0)

    n = len(model.model.layers)
    return {
        "mlp": torch.stack([score(("mlp", i)) for i in range(n)]),
        "attn": torch.stack([score(("attn", i)) for i in range(n)]),
        "norm": torch.stack([torch.stack([score(("norm0", i)), score(("norm1", i))])
                             for i in range(n)]),
        "layer_cosine": torch.stack([acts[("cos", i)][0].mean() for i in range(n)]),
    }


def _hf_loss(hf_dir, samples, drop=()):
    """Mean next-token loss of transformers' model with ``drop`` layers physically removed."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.model.layers = torch.nn.ModuleList(
        [l for i, l in enumerate(model.model.layers) if i not in drop])
    model.config.num_hidden_layers = len(model.model.layers)
    with torch.no_grad():
        logits = model(samples[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def reference(tiny_fp32_hf_dir):
    samples = _text_samples(tiny_fp32_hf_dir)
    return samples, _hf_reference(tiny_fp32_hf_dir, samples)


@pytest.mark.hf
@pytest.mark.megatron
@pytest.mark.parametrize("world, tp, pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2), (2, 1, 1)])
def test_scores_match_transformers_hooks(tiny_fp32_hf_dir, reference, world, tp, pp):
    samples, ref = reference
    blocks = (BLOCK,) if (world, tp, pp) in ((1, 1, 1), (2, 2, 1)) else ()
    results = run_ranks(_megatron_scores, world, tp=tp, pp=pp,
                        args=(tiny_fp32_hf_dir, CFG, samples, blocks))
    for got in results:  # every rank ends with the same full scores
        for key in ("mlp", "attn", "norm", "layer_cosine"):
            assert got[key].shape == ref[key].shape, key
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
        assert ref["mlp"].min() > 0 and ref["attn"].std() > 0.01  # non-trivial values
        assert got["lm_loss"] == pytest.approx(_hf_loss(tiny_fp32_hf_dir, samples), abs=1e-4)
    if blocks:
        losses = results[0]["block_loss"][BLOCK]
        expect = [_hf_loss(tiny_fp32_hf_dir, samples, range(s, s + BLOCK)) for s in range(3)]
        torch.testing.assert_close(losses, torch.tensor(expect, dtype=torch.float64), atol=1e-4,
                                   rtol=0)
        assert max(expect) - min(expect) > 1e-3  # the blocks are distinguishable


@pytest.mark.megatron
def test_scores_do_not_depend_on_layout(tiny_hf_dir):
    """Megatron-only (runs on the NeMo 24.05 stack too): TP=2 and PP=2 give the TP=1 scores."""
    cfg = get_preset("tiny_llama31")  # bf16 storage; the pass computes in fp32
    samples = _samples()[:4]
    [base] = run_ranks(_megatron_scores, 1, args=(tiny_hf_dir, cfg, samples, (BLOCK,)))
    for tp, pp in ((2, 1), (1, 2)):
        for got in run_ranks(_megatron_scores, 2, tp=tp, pp=pp,
                             args=(tiny_hf_dir, cfg, samples, (BLOCK,))):
            for key in ("mlp", "attn", "norm", "layer_cosine"):
                torch.testing.assert_close(got[key], base[key], rtol=1e-4, atol=1e-5, msg=key)
            torch.testing.assert_close(got["block_loss"][BLOCK], base["block_loss"][BLOCK],
                                       atol=1e-4, rtol=0)
