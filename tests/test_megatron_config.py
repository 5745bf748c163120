"""ModelConfig -> Megatron-Core, checked against Megatron-Core itself (both test tiers)."""
import pytest
import torch

from nemo_minitron.config import get_preset
from nemo_minitron.config.megatron import gpt_model_kwargs, to_transformer_config
from nemo_minitron.errors import ConfigError
from tests.helpers import run_ranks

pytestmark = pytest.mark.megatron


def test_transformer_config_fields():
    tc = to_transformer_config(get_preset("minitron_4b_width"), tp=2, pp=4, dtype="bfloat16",
                               cpu=True)
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (32, 3072, 9216)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (32, 8, 128)
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-5
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu
    assert not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.params_dtype == torch.bfloat16 and tc.bf16 and not tc.fp16
    assert tc.tensor_model_parallel_size == 2 and tc.pipeline_model_parallel_size == 4
    assert tc.use_cpu_initialization and not tc.apply_rope_fusion and not tc.bias_dropout_fusion


def test_transformer_config_rejects_bad_layout_first():
    with pytest.raises(ConfigError, match="num_query_groups=8 is not divisible by "
                                          "tensor_model_parallel_size=16"):
        to_transformer_config(get_preset("minitron_4b_width"), tp=16)


def test_gpt_model_kwargs():
    cfg = get_preset("minitron_4b_width").replace(make_vocab_size_divisible_by=128)
    kw = gpt_model_kwargs(cfg, tp=4, use_te=False)
    assert kw["vocab_size"] == 128512 and kw["rotary_base"] == 500000
    assert kw["position_embedding_type"] == "rope" and kw["rotary_percent"] == 1.0
    assert kw["share_embeddings_and_output_weights"] is False
    assert kw.get("rope_scaling", False) is False  # applied by nemo_minitron.model.rope instead
    assert "seq_len_interpolation_factor" not in kw


def test_te_spec_needs_transformer_engine():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="transformer_engine is not installed"):
            gpt_model_kwargs(get_preset("tiny_llama31"), use_te=True)
    else:  # the real TE (GPU container) or the 0.7.0 tier's import-only stand-in
        spec = gpt_model_kwargs(get_preset("tiny_llama31"), use_te=True)["transformer_layer_spec"]
        assert "LayerNormColumnParallelLinear" in \
            spec.submodules.self_attention.submodules.linear_qkv.__name__


def _param_counts(rank, cfg):
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.rope import llama3_inv_freq

    model = build_gpt_model(cfg)
    sharded = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    replicated = sum(p.numel() for p in model.parameters()
                     if not getattr(p, "tensor_model_parallel", False))
    emb = model.embedding.word_embeddings.weight.shape if ps.is_pipeline_first_stage() else None
    logits = None
    if ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage():
        ids = torch.randint(0, cfg.vocab_size, (2, 40))
        pos = torch.arange(40).unsqueeze(0).expand(2, -1)
        logits = tuple(model(ids, pos, None).shape)
    rope_ok = torch.equal(model.rotary_pos_emb.inv_freq, llama3_inv_freq(cfg))
    return dict(sharded=sharded, replicated=replicated, emb=emb, logits=logits, rope=rope_ok,
                tp_rank=ps.get_tensor_model_parallel_rank())


@pytest.mark.parametrize("name", ["tiny_llama31", "tiny_minitron_width", "tiny_minitron_depth"])
def test_megatron_model_has_exact_parameter_count(name):
    cfg = get_preset(name)
    [r] = run_ranks(_param_counts, 1, args=(cfg,))
    assert r["sharded"] + r["replicated"] == cfg.num_params()
    assert r["logits"] == (2, 40, cfg.padded_vocab_size(1))
    assert r["rope"]


def test_megatron_model_tp2_shards_exactly():
    cfg = get_preset("tiny_llama31").replace(make_vocab_size_divisible_by=100)  # pads at TP2
    assert cfg.padded_vocab_size(2) == 128400
    ranks = run_ranks(_param_counts, 2, tp=2, args=(cfg,))
    assert sum(r["sharded"] for r in ranks) + ranks[0]["replicated"] == cfg.num_params(tp=2)
    assert all(r["emb"] == (128400 // 2, cfg.hidden_size) for r in ranks)
    assert all(r["logits"] == (2, 40, 128400 // 2) for r in ranks)


def test_megatron_model_pp2_splits_layers():
    cfg = get_preset("tiny_llama31")
    ranks = run_ranks(_param_counts, 2, pp=2, args=(cfg,))
    assert sum(r["sharded"] + r["replicated"] for r in ranks) == cfg.num_params()
    assert ranks[0]["emb"] == (cfg.vocab_size, cfg.hidden_size) and ranks[1]["emb"] is None


def _param_dtypes(rank, cfg, dtype):
    from nemo_minitron.dist import compute_device
    from nemo_minitron.model.build import build_gpt_model

    model = build_gpt_model(cfg, dtype=dtype)
    return ({str(p.dtype) for p in model.parameters()},
            {str(p.device) for p in model.parameters()}, str(compute_device()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_parameter_in_the_model_dtype_on_the_rank_device(dtype):
    """Megatron's local spec builds its norms (plain torch.nn.RMSNorm without apex) in fp32 on
    the CPU whatever the config says; build_gpt_model places every parameter in the model's
    dtype on this rank's device (found on a GPU: 'weight is on cpu', the bf16 optimizer refusing
    fp32 parameters)."""
    [(dtypes, devices, device)] = run_ranks(_param_dtypes, 1,
                                            args=(get_preset("tiny_llama31"), dtype))
    assert dtypes == {f"torch.{dtype}"}
    assert devices == {device}
