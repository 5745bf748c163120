"""NeMo-native patches (nemo_minitron.nemo_native) against real Megatron-Core objects.

The real NeMo 2.0.0rc0 classes run in their own tier (tests/test_nemo_real.py, `make
test-nemo-real`: restore, logits, RoPE and LoRA width at TP=1, each also without its patch). Here,
in the tiers without NeMo, the NeMo side is played by STAND-INS for what that tier does not cover
(version gating, TP=2 adapter widths, the launcher and relaunch paths): ``StandInGPTModel`` and ``LoraPEFTConfig`` reproduce the
signatures and the relevant lines of NeMo 24.05 (tag v2.0.0rc0, commit 265bd739):
``MegatronGPTModel.model_provider_func(self, pre_process, post_process)`` building megatron-core's
GPTModel with ``rotary_base``/``seq_len_interpolation_factor`` from ``self.cfg``
(nemo/collections/nlp/models/language_modeling/megatron_gpt_model.py), and
``LoraPEFTConfig.__init__`` calling ``self._create_lora_config(cfg, lora_cfg, cfg.hidden_size,
cfg.hidden_size, LoraDenseAttentionAdapterConfig)`` for ``attention_dense``
(nemo/collections/nlp/parts/peft_config.py). The patches are applied to the stand-ins by the same
dotted-path mechanism as to NeMo. Everything the patches compute is compared with independent
references: transformers' llama3 ``inv_freq`` (current tier), the formula of shared/FACTS.md section
4 written out below (both tiers), and megatron-core's own ``linear_proj`` / ``RowParallelLinear``.
"""
import json
import math
import os
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from nemo_minitron.compat import cpu
from nemo_minitron.config import get_preset
from nemo_minitron.config.nemo import DoubleRopeScalingError, from_nemo_dict, to_nemo_dict
from nemo_minitron.errors import ConfigError, MinitronError
from nemo_minitron.model.rope import base_inv_freq, llama3_inv_freq
from nemo_minitron.nemo_native import launch, patches, versions
from tests.helpers import run_ranks

cpu.activate()
import megatron.core.models.gpt  # noqa: E402,F401  (imported once: forked workers start warm)
from megatron.core.models.common.embeddings.rotary_pos_embedding import (  # noqa: E402
    RotaryEmbedding)

cpu.activate()  # retarget what was just imported

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THIS = "tests.test_nemo_native"
GPT_TARGET = f"{THIS}:StandInGPTModel.model_provider_func"
LORA_TARGET = f"{THIS}:LoraPEFTConfig._create_lora_config"
SMALL_VOCAB = dict(vocab_size=256, bos_token_id=1, eos_token_id=2)


# ------------------------------------------------------------------ stand-ins for NeMo 24.05 code

class LoraKQVAdapterConfig(dict):
    """Stand-in for NeMo's adapter config dataclasses: keeps the keyword arguments."""


class LoraDenseAttentionAdapterConfig(dict):
    pass


class LoraPEFTConfig:
    """NeMo 2.0.0rc0 LoraPEFTConfig: same method names, signatures and width arguments."""

    def __init__(self, cfg):
        lora_cfg = cfg.peft.lora_tuning
        kv_channels = self._calculate_kv_channels(cfg)
        projection_size = kv_channels * cfg.num_attention_heads
        qkv_projection_size = projection_size + 2 * kv_channels * cfg.num_query_groups
        self.name_key_to_cfg = {}
        for module in lora_cfg.target_modules:
            if module == "attention_qkv":
                self.name_key_to_cfg["lora_kqv_adapter"] = self._create_lora_config(
                    cfg, lora_cfg, cfg.hidden_size, qkv_projection_size, LoraKQVAdapterConfig)
            elif module == "attention_dense":
                dense = self._create_lora_config(cfg, lora_cfg, cfg.hidden_size, cfg.hidden_size,
                                                 LoraDenseAttentionAdapterConfig)
                self.name_key_to_cfg["lora_dense_attention_adapter"] = dense

    def _calculate_kv_channels(self, cfg):
        if cfg.get("kv_channels", None) is None:
            return cfg.hidden_size // cfg.num_attention_heads
        return cfg.kv_channels

    def _create_lora_config(self, cfg, lora_cfg, in_features, out_features, adapter_cfg_cls,
                            num_query_groups=None, kv_channels=None):
        return adapter_cfg_cls(in_features=in_features, out_features=out_features,
                               dim=lora_cfg.adapter_dim)


class StandInGPTModel:
    """MegatronGPTModel.model_provider_func of NeMo 2.0.0rc0 (mcore_gpt path): GPTModel with the
    rotary arguments taken from the NeMo model config."""

    def __init__(self, cfg):
        self.cfg = cfg

    def model_provider_func(self, pre_process, post_process):
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel

        from nemo_minitron.compat import mcore
        from nemo_minitron.config.megatron import gpt_model_kwargs, to_transformer_config

        arch = from_nemo_dict(OmegaConf.to_container(self.cfg))
        tp = ps.get_tensor_model_parallel_world_size()
        kwargs = gpt_model_kwargs(arch, tp=tp, pre_process=pre_process, post_process=post_process)
        kwargs["rotary_base"] = self.cfg.get("rotary_base", 10000)
        kwargs["seq_len_interpolation_factor"] = self.cfg.get("seq_len_interpolation_factor", None)
        with mcore.final_norm_for_local_spec():
            return GPTModel(config=to_transformer_config(arch, tp=tp), **kwargs)


def nemo_model_cfg(preset="tiny_minitron_width", **changes):
    """The NeMo model config our converter writes for ``preset``, plus a LoRA section, as the
    DictConfig NeMo hands to its model and PEFT classes."""
    arch = get_preset(preset).replace(**SMALL_VOCAB, **changes)
    cfg = to_nemo_dict(arch)
    cfg["peft"] = {"lora_tuning": {"target_modules": ["attention_qkv", "attention_dense"],
                                   "adapter_dim": 8}}
    return OmegaConf.create(cfg)


# ---------------------------------------------------------------------- independent references

def facts_llama3_inv_freq(head_dim, theta, factor, low_freq_factor, high_freq_factor, original):
    """shared/FACTS.md section 4, element by element in float64, rounded to fp32 at the end."""
    out = []
    for i in range(head_dim // 2):
        f = theta ** (-2 * i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < original / high_freq_factor:
            out.append(f)
        elif wavelen > original / low_freq_factor:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float32)


def transformers_inv_freq(arch):
    from tests.test_rope import _transformers_inv_freq

    return _transformers_inv_freq(arch)


def nemo_rotary(arch, **extra):
    """A RotaryEmbedding with the arguments NeMo 24.05's GPTModel passes (megatron-core 0.7)."""
    return RotaryEmbedding(kv_channels=arch.head_dim, rotary_percent=1.0,
                           seq_len_interpolation_factor=extra.pop("seq_len_interpolation_factor",
                                                                  None),
                           rotary_base=int(arch.rope_theta), **extra)


@pytest.fixture
def patched():
    patches.remove()
    yield patches
    patches.remove()


# ---------------------------------------------------------------------------- version gating

# From NeMo's history (see nemo_minitron/nemo_native/versions.py for files and commits):
# llama3 RoPE from 2.0.0 (mcore_model_customize); dense LoRA width fixed in 2.0.0rc1.
@pytest.mark.parametrize("version,expected", [
    ("1.23.0", {"rope_llama3", "lora_dense_width"}),
    ("2.0.0rc0", {"rope_llama3", "lora_dense_width"}),   # 24.05
    ("2.0.0rc1", {"rope_llama3"}),                        # 24.07
    ("2.0.0", set()),                                     # 24.09
    ("2.1.0", set()),
    ("2.2.0", set()),
    ("2.5.0rc0", set()),
])
def test_version_gating(version, expected):
    assert set(versions.needed_patches(version)) == expected


def test_bad_version_is_one_clear_error():
    with pytest.raises(MinitronError, match="not a version number"):
        versions.needed_patches("twenty-four.05")


def test_hardcoded_rope_constants_of_nemo_2_0_are_checked():
    # Minitron's constants are the ones NeMo 2.0/2.1 hard-code
    patches.check_hardcoded_rope("2.0.0", nemo_model_cfg("minitron_4b_width"))
    with pytest.raises(ConfigError, match="hard-coded"):
        patches.check_hardcoded_rope("2.1.0", nemo_model_cfg())  # tiny: original context 32
    patches.check_hardcoded_rope("2.2.0", nemo_model_cfg())  # 2.2 reads the constants


def _fake_nemo_tree(tmp_path, version=("2", "0", "0", "rc0"), scripts=("megatron_gpt_eval.py",)):
    """A NeMo source tree: package_info.py, stand-in modules at NeMo's dotted paths, scripts."""
    pkg = tmp_path / "nemo"
    modules = {
        "collections/nlp/models/language_modeling/megatron_gpt_model.py":
            f"from {THIS} import StandInGPTModel as MegatronGPTModel\n",
        "collections/nlp/parts/peft_config.py":
            f"from {THIS} import LoraPEFTConfig, LoraDenseAttentionAdapterConfig\n",
    }
    for rel, text in modules.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        for parent in path.relative_to(tmp_path).parents:
            if str(parent) != ".":
                (tmp_path / parent / "__init__.py").touch()
    major, minor, patch, pre = version
    (pkg / "package_info.py").write_text(
        f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = '{pre}'\n")
    for rel in scripts:
        path = tmp_path / "examples" / "nlp" / "language_modeling" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(EVAL_SCRIPT)
    return tmp_path


def test_installed_version_is_read_without_importing_nemo(tmp_path, monkeypatch):
    root = _fake_nemo_tree(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    assert versions.installed_nemo_version() == "2.0.0rc0"
    assert "nemo" not in sys.modules


def test_no_nemo_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(versions, "nemo_package_dir", lambda: None)
    with pytest.raises(versions.NemoNotInstalledError, match="NeMo is not installed"):
        patches.apply()
    from nemo_minitron.cli import main

    assert main(["nemo", "megatron_gpt_eval.py"]) == 2


# -------------------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("preset", ["tiny_minitron_width", "minitron_4b_width"])
def test_patched_rotary_equals_llama3_references(patched, preset):
    arch = get_preset(preset)
    applied = patched.apply("2.0.0rc0", model_cfg=to_nemo_dict(arch))
    assert applied["rope_llama3"] == [patches.ROTARY_TARGET]
    rotary = nemo_rotary(arch)
    rs = arch.rope_scaling
    facts = facts_llama3_inv_freq(arch.head_dim, arch.rope_theta, rs.factor, rs.low_freq_factor,
                                  rs.high_freq_factor, rs.original_max_position_embeddings)
    assert not torch.allclose(facts, base_inv_freq(arch.head_dim, arch.rope_theta))
    torch.testing.assert_close(rotary.inv_freq, facts, rtol=1e-6, atol=0)
    torch.testing.assert_close(rotary.inv_freq, llama3_inv_freq(arch), rtol=0, atol=0)
    assert getattr(rotary, patches.SCALED_FLAG)


@pytest.mark.parametrize("preset", ["tiny_minitron_width", "minitron_4b_width"])
def test_patched_rotary_equals_transformers(patched, preset):
    arch = get_preset(preset)
    reference = transformers_inv_freq(arch)  # skips without transformers (NeMo 24.05 tier)
    patched.apply("2.0.0rc0", model_cfg=to_nemo_dict(arch))
    torch.testing.assert_close(nemo_rotary(arch).inv_freq, reference, rtol=1e-6, atol=0)


def test_patch_is_idempotent(patched):
    arch = get_preset("tiny_minitron_width")
    first = patched.apply("2.0.0rc0", model_cfg=arch)
    wrapped = RotaryEmbedding.__init__
    second = patched.apply("2.0.0rc0", model_cfg=arch)
    assert first["rope_llama3"] and second["rope_llama3"] == []
    assert RotaryEmbedding.__init__ is wrapped
    torch.testing.assert_close(nemo_rotary(arch).inv_freq, llama3_inv_freq(arch), rtol=0, atol=0)
    patched.remove()
    assert torch.equal(nemo_rotary(arch).inv_freq, base_inv_freq(arch.head_dim, arch.rope_theta))


def test_no_op_for_plain_rope_config_and_for_fixed_nemo(patched):
    arch = get_preset("tiny_minitron_width")
    plain = base_inv_freq(arch.head_dim, arch.rope_theta)
    patched.apply("2.0.0rc0", model_cfg=to_nemo_dict(arch.replace(rope_scaling=None)))
    rotary = nemo_rotary(arch)
    assert torch.equal(rotary.inv_freq, plain) and not hasattr(rotary, patches.SCALED_FLAG)
    patched.remove()
    original = RotaryEmbedding.__init__
    assert patched.apply("2.0.0", model_cfg=to_nemo_dict(arch.replace(
        rope_scaling=get_preset("minitron_4b_width").rope_scaling))) == {}
    assert RotaryEmbedding.__init__ is original
    assert torch.equal(nemo_rotary(arch).inv_freq, plain)


def test_megatron_own_llama3_scaling_is_not_scaled_again(patched):
    import inspect

    if "rope_scaling" not in inspect.signature(RotaryEmbedding.__init__).parameters:
        pytest.skip("megatron-core < 0.10 has no rope_scaling")
    arch = get_preset("minitron_4b_width")  # megatron-core hard-codes its constants
    patched.apply("2.0.0rc0", model_cfg=arch)
    rotary = nemo_rotary(arch, rope_scaling=True, rope_scaling_factor=8.0)
    torch.testing.assert_close(rotary.inv_freq, llama3_inv_freq(arch), rtol=1e-6, atol=0)
    assert not hasattr(rotary, patches.SCALED_FLAG)


def test_interpolation_plus_llama3_is_refused(patched):
    arch = get_preset("tiny_minitron_width")
    patched.apply("2.0.0rc0", model_cfg=arch)
    with pytest.raises(DoubleRopeScalingError, match="twice"):
        nemo_rotary(arch, seq_len_interpolation_factor=8.0)
    bad = nemo_model_cfg()
    bad.seq_len_interpolation_factor = 8.0
    with pytest.raises(DoubleRopeScalingError):
        patched.apply("2.0.0rc0", model_cfg=bad)


def _build_through_nemo_path(rank, version, nemo_changes):
    """In a forked rank: patch, then let the stand-in model_provider_func build the GPTModel."""
    applied = patches.apply(version, nemo_gpt_target=GPT_TARGET, nemo_lora_target=LORA_TARGET)
    model = StandInGPTModel(nemo_model_cfg(**nemo_changes)).model_provider_func(True, True)
    outside = RotaryEmbedding(kv_channels=32, rotary_percent=1.0, rotary_base=500000)
    return applied, model.rotary_pos_emb.inv_freq.clone(), outside.inv_freq.clone()


# 2.0.0rc0 (scaled) runs on NeMo's real model_provider_func in tests/test_nemo_real.py
@pytest.mark.parametrize("version,scaled", [("2.0.0", False)])
def test_gpt_model_built_by_nemo_provider_gets_llama3_rope(version, scaled):
    arch = get_preset("tiny_minitron_width")
    (applied, inv_freq, outside), = run_ranks(_build_through_nemo_path, args=(version, {}))
    assert (GPT_TARGET in applied.get("rope_llama3", [])) == scaled
    expected = llama3_inv_freq(arch) if scaled else base_inv_freq(arch.head_dim, arch.rope_theta)
    torch.testing.assert_close(inv_freq, expected, rtol=0, atol=0)
    # outside model_provider_func no model config is active: plain RoPE
    assert torch.equal(outside, base_inv_freq(32, 500000.0))


def test_gpt_model_of_plain_rope_config_is_untouched():
    arch = get_preset("tiny_minitron_width")
    (_, inv_freq, _), = run_ranks(_build_through_nemo_path,
                                   args=("2.0.0rc0", {"rope_scaling": None}))
    assert torch.equal(inv_freq, base_inv_freq(arch.head_dim, arch.rope_theta))


# -------------------------------------------------------------------------------------- LoRA

def _lora_against_linear_proj(rank, version):
    """In a forked TP rank: the dense LoRA adapter width from the (patched) stand-in PEFT config,
    checked against the real linear_proj and fed linear_proj's real input."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import RowParallelLinear

    from nemo_minitron.model.forward import stage_forward

    patches.apply(version, nemo_gpt_target=GPT_TARGET, nemo_lora_target=LORA_TARGET)
    cfg = nemo_model_cfg()
    model = StandInGPTModel(cfg).model_provider_func(True, True)
    proj = model.decoder.layers[0].self_attention.linear_proj
    seen = []
    proj.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    stage_forward(model, torch.randint(0, SMALL_VOCAB["vocab_size"], (2, 5)))
    lora = LoraPEFTConfig(cfg).name_key_to_cfg
    dense, qkv = lora["lora_dense_attention_adapter"], lora["lora_kqv_adapter"]
    # what NeMo's ParallelLinearAdapter builds for input_is_parallel=True (LoraDenseAttention...)
    linear_in = RowParallelLinear(dense["in_features"], dense["dim"], config=model.config,
                                  input_is_parallel=True, skip_bias_add=True, bias=False,
                                  init_method=torch.nn.init.normal_)
    try:
        out, _ = linear_in(seen[0])
        error = None
    except RuntimeError as e:  # shape mismatch
        out, error = None, str(e).splitlines()[0]
    return dict(tp=ps.get_tensor_model_parallel_world_size(), dense=dict(dense), qkv=dict(qkv),
                proj_in=proj.weight.shape[1], adapter_in=linear_in.weight.shape[1],
                out_shape=None if out is None else tuple(out.shape), error=error)


@pytest.mark.parametrize("tp", [2])  # TP=1: NeMo's real LoraPEFTConfig, tests/test_nemo_real.py
def test_lora_dense_width_is_heads_times_head_dim(tp):
    arch = get_preset("tiny_minitron_width")
    assert arch.num_attention_heads * arch.head_dim != arch.hidden_size  # the Minitron quirk
    results = run_ranks(_lora_against_linear_proj, world_size=tp, tp=tp, args=("2.0.0rc0",))
    for r in results:
        width = patches.dense_lora_in_features(arch.num_attention_heads, arch.head_dim)
        assert r["proj_in"] * tp == width == r["dense"]["in_features"]
        assert r["adapter_in"] == r["proj_in"]  # per rank, as linear_proj
        assert r["error"] is None and r["out_shape"] == (5, 2, 8)
        assert r["dense"]["out_features"] == arch.hidden_size
        assert r["qkv"]["in_features"] == arch.hidden_size  # other adapters untouched
        assert r["qkv"]["out_features"] == (arch.num_attention_heads
                                            + 2 * arch.num_query_groups) * arch.head_dim


def test_lora_patch_targets_only_the_dense_adapter_and_is_idempotent(patched):
    cfg = nemo_model_cfg()
    first = patched.apply("2.0.0rc0", nemo_gpt_target=GPT_TARGET, nemo_lora_target=LORA_TARGET)
    second = patched.apply("2.0.0rc0", nemo_gpt_target=GPT_TARGET, nemo_lora_target=LORA_TARGET)
    assert first["lora_dense_width"] == [LORA_TARGET] and second["lora_dense_width"] == []
    lora = LoraPEFTConfig(cfg).name_key_to_cfg
    assert lora["lora_dense_attention_adapter"]["in_features"] == 4 * 32
    # a config without kv_channels: NeMo's rule (hidden/heads) gives hidden again
    no_kv = nemo_model_cfg("tiny_llama31")
    no_kv.kv_channels = None
    assert LoraPEFTConfig(no_kv).name_key_to_cfg["lora_dense_attention_adapter"]["in_features"] \
        == 64
    patched.remove()
    assert LoraPEFTConfig(cfg).name_key_to_cfg["lora_dense_attention_adapter"]["in_features"] == 48


def test_missing_nemo_target_is_one_clear_error(patched):
    with pytest.raises(patches.NemoPatchError, match="NoSuchClass"):
        patched.apply("2.0.0rc0", nemo_gpt_target=f"{THIS}:NoSuchClass.model_provider_func",
                      nemo_lora_target=LORA_TARGET)


# ------------------------------------------------------------------------ launcher and conf/nemo

EVAL_SCRIPT = textwrap.dedent('''
    """Stand-in for megatron_gpt_eval.py: builds the model and LoRA config as NeMo would and
    records what it got."""
    import __main__, json, os, sys
    from omegaconf import OmegaConf
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.peft_config import LoraPEFTConfig
    from tests.test_nemo_native import nemo_model_cfg

    args = dict(a.lstrip("+").split("=", 1) for a in sys.argv[1:])
    cfg = nemo_model_cfg()
    model = MegatronGPTModel(cfg).model_provider_func(True, True)
    lora = LoraPEFTConfig(cfg).name_key_to_cfg["lora_dense_attention_adapter"]
    # how PyTorch Lightning relaunches ranks 1.. of a `python` launch (_basic_subprocess_cmd)
    if __main__.__spec__ is None:
        relaunch = [sys.executable, os.path.abspath(sys.argv[0])] + sys.argv[1:]
    else:
        relaunch = [sys.executable, "-m", __main__.__spec__.name] + sys.argv[1:]
    with open(args["out"], "w") as f:
        json.dump({"argv": sys.argv, "inv_freq": model.rotary_pos_emb.inv_freq.tolist(),
                   "lora_in": lora["in_features"], "relaunch": relaunch}, f)
    sys.exit(int(args.get("exit", 0)))
''')


def _run_cli_in_fake_nemo(rank, root, argv):
    sys.path.insert(0, root)
    from nemo_minitron.cli import main

    return main(argv)


def _run_relaunched_rank(rank, root, cmd):
    """A rank that Lightning started with ``cmd``, as a fresh process would run it (unpatched)."""
    import runpy

    sys.path.insert(0, root)
    assert cmd[1] == launch.RELAUNCH and not getattr(RotaryEmbedding.__init__,
                                                     "_nemo_minitron_wrapped", False)
    sys.argv = cmd[1:]
    try:
        runpy.run_path(cmd[1], run_name="__main__")
    except SystemExit as e:
        return e.code


def test_cli_runs_nemo_script_in_process_with_patches(tmp_path, monkeypatch):
    root = _fake_nemo_tree(tmp_path / "NeMo")
    out = tmp_path / "result.json"
    conf = os.path.join(ROOT, "nemo_minitron", "conf", "nemo", "megatron_gpt_eval_minitron_4b_width.yaml")
    rc, = run_ranks(_run_cli_in_fake_nemo, args=(str(root), [
        "nemo", "megatron_gpt_eval.py", "--overrides", conf, f"out={out}", "exit=3"]))
    assert rc == 3  # the script's exit status
    got = json.loads(out.read_text())
    assert got["argv"][1:] == launch.hydra_overrides(conf) + [f"out={out}", "exit=3"]
    assert "inference.end_strings=['<|end_of_text|>']" in got["argv"]
    arch = get_preset("tiny_minitron_width")
    torch.testing.assert_close(torch.tensor(got["inv_freq"]), llama3_inv_freq(arch), rtol=0,
                               atol=0)
    assert got["lora_in"] == arch.num_attention_heads * arch.head_dim
    # a rank Lightning relaunches from that command line runs the same script, patched too
    out.unlink()
    script = str(root / "examples/nlp/language_modeling/megatron_gpt_eval.py")
    monkeypatch.setenv(launch.SCRIPT_ENV, script)
    rc, = run_ranks(_run_relaunched_rank, args=(str(root), got["relaunch"]))
    child = json.loads(out.read_text())
    assert rc == 3 and child["argv"][1:] == got["argv"][1:]
    assert child["inv_freq"] == got["inv_freq"] and child["lora_in"] == got["lora_in"]


def _other_entry_points(rank, root, out):
    import importlib
    import runpy

    sys.path.insert(0, root)
    autopatch = importlib.import_module("nemo_minitron.nemo_native.autopatch")
    wrapped = getattr(RotaryEmbedding.__init__, "_nemo_minitron_wrapped", False)
    sys.argv = ["-m", "megatron_gpt_eval.py", f"out={out}"]
    try:
        runpy.run_module("nemo_minitron.nemo_native", run_name="__main__")
    except SystemExit as e:
        return autopatch.APPLIED, wrapped, e.code


def test_autopatch_import_and_python_m(tmp_path):
    root = _fake_nemo_tree(tmp_path / "NeMo")
    out = tmp_path / "result.json"
    (applied, wrapped, rc), = run_ranks(_other_entry_points, args=(str(root), str(out)))
    assert set(applied) == {"rope_llama3", "lora_dense_width"} and wrapped and rc == 0
    got = json.loads(out.read_text())
    arch = get_preset("tiny_minitron_width")
    assert got["inv_freq"] == llama3_inv_freq(arch).tolist()
    assert got["lora_in"] == arch.num_attention_heads * arch.head_dim


def test_script_resolution(tmp_path, monkeypatch):
    root = _fake_nemo_tree(tmp_path, scripts=("megatron_gpt_eval.py",
                                              "tuning/megatron_gpt_finetuning.py",
                                              "other/megatron_gpt_finetuning.py"))
    lm = root / "examples" / "nlp" / "language_modeling"
    assert launch.resolve_script("megatron_gpt_eval.py", str(root)) == \
        str(lm / "megatron_gpt_eval.py")
    assert launch.resolve_script("tuning/megatron_gpt_finetuning.py", str(root)) == \
        str(lm / "tuning" / "megatron_gpt_finetuning.py")
    with pytest.raises(MinitronError, match="ambiguous"):
        launch.resolve_script("megatron_gpt_finetuning.py", str(root))
    with pytest.raises(MinitronError, match="no such script"):
        launch.resolve_script("megatron_gpt_nope.py", str(root))
    monkeypatch.syspath_prepend(str(root))
    assert launch.nemo_root() == str(root)


# Key paths of NeMo 24.05's own configs (tag v2.0.0rc0, commit 265bd739), copied from
# examples/nlp/language_modeling/conf/megatron_gpt_inference.yaml and
# examples/nlp/language_modeling/tuning/conf/megatron_gpt_finetuning_config.yaml (the keys we set
# and their neighbours; a typo in conf/nemo would not be among them).
NEMO_2405_KEYS = {
    "megatron_gpt_eval_minitron_4b_width.yaml": {
        "inference.greedy", "inference.top_k", "inference.top_p", "inference.temperature",
        "inference.add_BOS", "inference.tokens_to_generate", "inference.all_probs",
        "inference.repetition_penalty", "inference.min_tokens_to_generate",
        "inference.compute_logprob", "inference.end_strings", "trainer.devices",
        "trainer.num_nodes", "trainer.accelerator", "trainer.logger", "trainer.precision",
        "trainer.use_distributed_sampler", "tensor_model_parallel_size",
        "pipeline_model_parallel_size", "pipeline_model_parallel_split_rank", "megatron_amp_O2",
        "gpt_model_file", "checkpoint_dir", "checkpoint_name", "hparams_file", "prompts",
    },
    "megatron_gpt_finetuning_lora_minitron_4b_width.yaml": {
        "trainer.devices", "trainer.accelerator", "trainer.num_nodes", "trainer.precision",
        "trainer.max_epochs", "trainer.max_steps", "trainer.log_every_n_steps",
        "trainer.val_check_interval", "trainer.gradient_clip_val", "exp_manager.exp_dir",
        "exp_manager.explicit_log_dir", "model.seed", "model.tensor_model_parallel_size",
        "model.pipeline_model_parallel_size", "model.global_batch_size", "model.micro_batch_size",
        "model.restore_from_path", "model.megatron_amp_O2", "model.sequence_parallel",
        "model.peft.peft_scheme", "model.peft.restore_from_path",
        "model.peft.lora_tuning.variant", "model.peft.lora_tuning.target_modules",
        "model.peft.lora_tuning.adapter_dim", "model.peft.lora_tuning.alpha",
        "model.peft.lora_tuning.adapter_dropout", "model.peft.lora_tuning.column_init_method",
        "model.peft.lora_tuning.row_init_method", "model.peft.lora_tuning.layer_selection",
        "model.data.train_ds.file_names", "model.data.train_ds.max_seq_length",
        "model.data.train_ds.add_eos", "model.data.train_ds.add_bos",
        "model.data.train_ds.label_key", "model.data.train_ds.truncation_field",
        "model.data.train_ds.prompt_template", "model.data.validation_ds.file_names",
        "model.data.validation_ds.max_seq_length", "model.optim.name", "model.optim.lr",
        "model.optim.weight_decay",
    },
}


@pytest.mark.parametrize("name", sorted(NEMO_2405_KEYS))
def test_conf_nemo_keys_exist_in_nemo_2405_config(name):
    path = os.path.join(ROOT, "nemo_minitron", "conf", "nemo", name)
    conf = OmegaConf.load(path)  # the file as OmegaConf reads it
    data, new_keys = launch.load_overrides(path)
    leaves = [k for k, _ in launch._leaves(data)]
    new = [k for k in leaves if any(k == n or k.startswith(n + ".") for n in new_keys)]
    assert sorted(set(leaves) - set(new) - NEMO_2405_KEYS[name]) == []
    overrides = launch.hydra_overrides(path)
    assert len(overrides) == len(leaves)
    assert all(o.startswith("+") == (o.split("=")[0].lstrip("+") in new) for o in overrides)
    if "eval" in name:
        assert list(conf.inference.end_strings) == ["<|end_of_text|>"]
        assert conf.trainer.precision == "bf16"
        assert conf.tensor_model_parallel_size * conf.pipeline_model_parallel_size \
            == conf.trainer.devices
    else:
        assert new == ["model.tokenizer.library", "model.tokenizer.type",
                       "model.tokenizer.use_fast"]
        assert conf.model.peft.peft_scheme == "lora"
        assert "attention_dense" in conf.model.peft.lora_tuning.target_modules
        assert conf.trainer.precision == "bf16"
        assert conf.model.tensor_model_parallel_size * conf.model.pipeline_model_parallel_size \
            == conf.trainer.devices


def test_hydra_values_keep_special_strings(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("a:\n  s: \"it's <|x|>\"\n  l: [1, 2.5, true, null, 'true', x/y-1.z, '1e5']\n"
                    "b: {}\nnew_keys: [a.s]\n")
    assert launch.hydra_overrides(str(path)) == [
        "+a.s='it\\'s <|x|>'", "a.l=[1,2.5,true,null,'true',x/y-1.z,'1e5']", "b={}"]
    path.write_text("a: 1\nnew_keys: [c]\n")
    with pytest.raises(ConfigError, match="new_keys"):
        launch.hydra_overrides(str(path))
