"""The real NeMo 2.0.0rc0 (NeMo 24.05's nemo_toolkit) restores the .nemo files we write, and with
our patches runs this family correctly: on a CPU, with megatron-core 0.7.0 and torch 2.3.1.

Runs in the `make test-nemo-real` tier (requirements/nemo-real.txt); skipped where NeMo is not
installed. The stand-ins a CPU needs are in tests/support/nemo_cpu.py. The oracle is transformers'
LlamaForCausalLM run by the current stack (tests/support/hf_reference.py): NeMo 24.05's
transformers 4.40 cannot run head_dim != hidden/heads or llama3 RoPE.

What NeMo's scripts do is reproduced from their v2.0.0rc0 sources:
examples/nlp/language_modeling/megatron_gpt_eval.py (restore with return_config, then the
overrides below, then restore with that config) and tuning/megatron_gpt_finetuning.py
(``merge_cfg_with`` of the fine-tuning config's ``model`` section, then ``add_adapter``).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REQUIRED = os.environ.get("NEMO_MINITRON_REQUIRE_NEMO") == "1"  # set by `make test-nemo-real`
if REQUIRED and importlib.util.find_spec("nemo") is None:
    raise RuntimeError("NEMO_MINITRON_REQUIRE_NEMO=1 but NeMo (nemo_toolkit) is not installed")
pytestmark = [pytest.mark.megatron, pytest.mark.skipif(
    importlib.util.find_spec("nemo") is None, reason="NeMo (nemo_toolkit) is not installed: "
    "the real-NeMo tier is `make test-nemo-real`")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_PYTHON = os.environ.get("NEMO_MINITRON_REFERENCE_PYTHON",
                                  os.path.join(ROOT, ".venv", "bin", "python"))
IDS = [[128000, 791, 4062, 14198, 39935, 35308, 927, 279],
       [128000, 9906, 11, 856, 836, 374, 11, 323]]
NEW_TOKENS = 6
CPU_KEYS = {"transformer_engine": False, "use_cpu_initialization": True}  # what a CPU needs


@pytest.fixture(scope="module")
def nemo(files):  # after `files`: its job-saved .nemo is written by forked ranks before NeMo loads
    sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
    import nemo_cpu

    nemo_cpu.enable()
    from nemo_minitron.nemo_native import patches

    patches.apply()
    return nemo_cpu


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny fp32 HF checkpoint (the family's quirks: head_dim != hidden/heads, GQA, llama3 RoPE,
    untied embeddings), its .nemo with default flags (bf16) and in fp32, and transformers' logits,
    greedy tokens and RoPE frequencies for it."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    from tests.helpers import run_ranks

    root = tmp_path_factory.mktemp("nemo_real")
    hf = write_tiny_hf_checkpoint(str(root / "hf"), preset="tiny_llama31", seed=1, dtype="float32")
    default = hf_to_nemo(hf, str(root / "default.nemo"), progress=False)
    fp32 = hf_to_nemo(hf, str(root / "fp32.nemo"), dtype="fp32", progress=False)
    job = str(root / "job.nemo")
    run_ranks(_save_as_a_job, world_size=2, tp=2, args=(hf, job))
    return dict(hf=hf, default=default, fp32=fp32, job=job, root=root)


def _save_as_a_job(rank, hf_dir, out):
    """The model saved the way every job writes its .nemo output (model/save.py: all ranks through
    Megatron's dist_checkpointing.save, rank 0 packing the archive), here by a TP=2 job."""
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.save import save_model
    from nemo_minitron.model.source import ModelSource

    with ModelSource(hf_dir) as source:
        cfg = source.config.replace(dtype="float32")
        model = build_gpt_model(cfg, dtype="float32", use_te=False)
        source.load_into(model, cfg)
        return save_model(model, cfg, out, base=hf_dir)


@pytest.fixture(scope="module")
def reference(files):
    if not os.path.exists(REFERENCE_PYTHON):
        (pytest.fail if REQUIRED else pytest.skip)(
            f"no current-stack interpreter at {REFERENCE_PYTHON} for transformers' reference "
            "(make venv; or set NEMO_MINITRON_REFERENCE_PYTHON)")
    request, out = files["root"] / "request.json", files["root"] / "reference.pt"
    request.write_text(json.dumps({"input_ids": IDS, "new_tokens": NEW_TOKENS}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([REFERENCE_PYTHON, os.path.join(ROOT, "tests", "support", "hf_reference.py"),
                    files["hf"], str(request), str(out)], check=True, env=env,
                   capture_output=True, timeout=300)
    return torch.load(out, weights_only=True)


def restore_as_eval_script(path, trainer, extra=None):
    """megatron_gpt_eval.py (v2.0.0rc0) with tensor/pipeline parallel 1 and ``extra`` keys."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector
    from omegaconf import OmegaConf, open_dict

    connector = NLPSaveRestoreConnector()
    cfg = MegatronGPTModel.restore_from(restore_path=path, trainer=trainer, return_config=True,
                                        save_restore_connector=connector)
    OmegaConf.set_struct(cfg, True)
    with open_dict(cfg):
        cfg.sequence_parallel = False
        cfg.activations_checkpoint_granularity = None
        cfg.activations_checkpoint_method = None
        cfg.precision = trainer.precision
        cfg["use_flash_attention"] = False
        cfg["apply_rope_fusion"] = False
        if cfg.get("mcore_gpt", False):
            cfg.tensor_model_parallel_size = 1
            cfg.pipeline_model_parallel_size = 1
            cfg.expert_model_parallel_size = 1
            cfg.micro_batch_size = 1
        if trainer.precision == "16":
            cfg.megatron_amp_O2 = False
        for key, value in (extra or {}).items():
            cfg[key] = value
    return MegatronGPTModel.restore_from(restore_path=path, trainer=trainer,
                                         override_config_path=cfg,
                                         save_restore_connector=connector, map_location="cpu")


@pytest.fixture(scope="module")
def fp32_model(nemo, files):
    model = restore_as_eval_script(files["fp32"], nemo.cpu_trainer(), CPU_KEYS)
    return nemo.after_restore(model).eval()


def _logits(model, ids):
    s = ids.shape[1]
    positions = torch.arange(s).unsqueeze(0).expand_as(ids)
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True: masked
    with torch.no_grad():
        return model.model(ids, positions, causal).float()


def test_default_nemo_restores_offline_with_the_scripts_overrides_only(nemo, files, monkeypatch):
    """`convert hf-to-nemo` with default flags (bf16, hub id as tokenizer.type): NeMo's eval-script
    restore succeeds with no network (the hub id cannot resolve: the packed tokenizer is used) and
    only the two keys a CPU needs; the restored config has Llama's zero dropouts."""
    from tokenizers import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model = restore_as_eval_script(files["default"], nemo.cpu_trainer(), CPU_KEYS)
    cfg = model.cfg
    assert cfg.tokenizer.type == "nvidia/Llama-3.1-Minitron-4B-Width-Base"  # kept as written
    assert (cfg.hidden_dropout, cfg.attention_dropout, cfg.ffn_dropout) == (0.0, 0.0, 0.0)
    assert model.cfg.kv_channels == 32 and model.cfg.num_query_groups == 2
    packed = Tokenizer.from_file(os.path.join(files["hf"], "tokenizer.json"))
    text = "Minitron is a pruned and distilled Llama-3.1."
    assert model.tokenizer.text_to_ids(text) == packed.encode(text, add_special_tokens=False).ids


def test_offline_restore_needs_the_packed_tokenizer_patch(nemo, files, monkeypatch):
    """Without our packed_tokenizer patch, NeMo 2.0.0rc0 looks the hub id up and fails offline:
    the patch is what makes the offline restore above work."""
    from nemo_minitron.nemo_native import patches

    owner, attr, wrapped = patches._resolve(patches.NEMO_TOKENIZER_TARGET)
    monkeypatch.setattr(owner, attr, wrapped.__wrapped__)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(Exception, match="(?i)offline|connect|resolve|couldn't|can't load|not a "
                                        "valid|does not appear|huggingface"):
        restore_as_eval_script(files["default"], nemo.cpu_trainer(), CPU_KEYS)


def test_logits_equal_transformers(fp32_model, reference):
    """fp32 logits of NeMo's restored model vs transformers: <= 1e-4 with our RoPE patch."""
    got = _logits(fp32_model, torch.tensor(IDS))
    assert got.shape == reference["logits"].shape
    diff = (got - reference["logits"]).abs().max().item()
    assert diff <= 1e-4, diff


def test_a_jobs_nemo_restores_with_transformers_logits(nemo, files, reference):
    """A .nemo a job wrote (TP=2, saved by both ranks) restores in NeMo at TP=1 with only the eval
    script's overrides and the CPU keys, and gives transformers' logits (fp32, <= 1e-4)."""
    model = nemo.after_restore(restore_as_eval_script(files["job"], nemo.cpu_trainer(),
                                                      CPU_KEYS)).eval()
    diff = (_logits(model, torch.tensor(IDS)) - reference["logits"]).abs().max().item()
    assert diff <= 1e-4, diff


def test_rope_frequencies_are_transformers_llama3(fp32_model, reference):
    inv_freq = fp32_model.model.rotary_pos_emb.inv_freq.float()
    torch.testing.assert_close(inv_freq, reference["inv_freq"], rtol=1e-6, atol=0)


def test_greedy_generation_equals_transformers(fp32_model, reference):
    """NeMo's own text generation (its GPT strategy, greedy) gives transformers' tokens."""
    from nemo.collections.nlp.modules.common.text_generation_strategy import (
        GPTModelTextGenerationStrategy)

    ids = torch.tensor(IDS)
    context = torch.cat([ids, torch.zeros(ids.shape[0], NEW_TOKENS, dtype=ids.dtype)], dim=1)
    lengths = torch.full((ids.shape[0],), ids.shape[1])
    out = fp32_model.generate(
        inputs=(context, lengths), length_params={"max_length": NEW_TOKENS,
                                                  "min_length": NEW_TOKENS},
        sampling_params={"use_greedy": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                         "repetition_penalty": 1.0, "add_BOS": False, "all_probs": False,
                         "compute_logprob": False, "end_strings": []},
        # the strategy NeMo's dispatcher picks for a MegatronGPTModel, passed directly: the
        # dispatcher imports NeMo's multimodal models first (torchvision, decord)
        strategy=GPTModelTextGenerationStrategy(fp32_model))
    got = torch.stack([torch.as_tensor(t) for t in out["token_ids"]])
    assert torch.equal(got, reference["greedy"]), (got, reference["greedy"])


def _lora_model(nemo, path):
    """megatron_gpt_finetuning.py's path: merge_cfg_with the fine-tuning config, restore, then
    NeMo's own LoraPEFTConfig + add_adapter on linear_qkv and linear_proj (attention_dense)."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import (
        MegatronGPTSFTModel)
    from nemo.collections.nlp.parts.peft_config import LoraPEFTConfig
    from omegaconf import OmegaConf

    finetuning = OmegaConf.create({  # the keys of megatron_gpt_finetuning_config.yaml's model:
        "trainer": {"precision": 32},  # section that matter here, with its values
        "model": {"megatron_amp_O2": False, "sequence_parallel": False, "micro_batch_size": 1,
                  "global_batch_size": 1, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "ffn_dropout": 0.0, "answer_only_loss": True, **CPU_KEYS,
                  "peft": {"peft_scheme": "lora", "restore_from_path": None, "lora_tuning": {
                      "variant": "nemo", "target_modules": ["attention_qkv", "attention_dense"],
                      "adapter_dim": 4, "alpha": 4, "adapter_dropout": 0.0,
                      "column_init_method": "xavier", "row_init_method": "zero",
                      "layer_selection": None, "weight_tying": False,
                      "position_embedding_strategy": None}},
                  "data": {}}})
    cfg = MegatronGPTSFTModel.merge_cfg_with(path, finetuning)
    model = MegatronGPTSFTModel.restore_from(path, cfg, trainer=nemo.cpu_trainer(),
                                             map_location="cpu")
    nemo.after_restore(model)
    model.add_adapter(LoraPEFTConfig(cfg))
    dense = [m for n, m in model.named_modules()
             if n.endswith("self_attention.adapter_layer.lora_dense_attention_adapter")]
    assert len(dense) == cfg.num_layers, "no LoRA adapter on linear_proj"
    return model.eval(), cfg, [m.linear_in.weight.shape[1] for m in dense]


def test_lora_from_nemos_peft_code_has_heads_x_head_dim_input(nemo, files):
    """The dense adapter's input is heads x head_dim (128 here; hidden is 64); a forward runs."""
    model, cfg, widths = _lora_model(nemo, files["fp32"])
    heads_x_head_dim = cfg.num_attention_heads * cfg.kv_channels
    assert heads_x_head_dim != cfg.hidden_size
    assert widths == [heads_x_head_dim] * cfg.num_layers
    logits = _logits(model, torch.tensor(IDS))
    assert logits.shape == (2, len(IDS[0]), 128256) and torch.isfinite(logits).all()


def test_lora_without_our_patch_is_nemo_2405s_bug(nemo, files, monkeypatch):
    """Without lora_dense_width, NeMo 2.0.0rc0 builds the dense adapter with input hidden_size and
    the forward fails: the patch is what the test above measures."""
    from nemo_minitron.nemo_native import patches

    owner, attr, wrapped = patches._resolve(patches.NEMO_LORA_TARGET)
    monkeypatch.setattr(owner, attr, wrapped.__wrapped__)
    model, cfg, widths = _lora_model(nemo, files["fp32"])
    assert widths == [cfg.hidden_size] * cfg.num_layers
    with pytest.raises(RuntimeError, match="shape|size|mat"):
        _logits(model, torch.tensor(IDS))


def test_legacy_nemo_has_the_te_models_keys_and_its_logits(fp32_model, nemo, files, reference):
    """A legacy .nemo (model_weights.ckpt) stores Transformer Engine names, which NeMo with TE
    loads as they are; on this CPU (local spec) NeMo's restore cannot load them (its norms are
    separate modules). The TE names are the local model's through megatron-core's own
    local-to-TE map (``sharded_state_dict_keys_map`` of the local spec): the legacy file holds
    exactly those keys, and its tensors, loaded by that map into NeMo's restored model, give
    transformers' logits."""
    import tarfile

    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    legacy = hf_to_nemo(files["hf"], str(files["root"] / "legacy.nemo"), dtype="fp32",
                        fmt="legacy", progress=False)
    with tarfile.open(legacy) as tar:
        tar.extract("./model_weights.ckpt", files["root"] / "legacy", filter="data")
    stored = torch.load(files["root"] / "legacy" / "model_weights.ckpt", weights_only=True)
    layer = fp32_model.model.decoder.layers[0]
    to_te = layer.submodules_config.sharded_state_dict_keys_map  # megatron-core's, not ours
    assert to_te, "the local spec no longer maps its norms to TE names"

    def te_name(name):
        for local, te in to_te.items():
            name = name.replace(f".{local}", f".{te}")
        return name

    own = {k: v for k, v in fp32_model.state_dict().items() if not k.endswith("_extra_state")}
    renamed = {te_name(k): k for k in own}
    assert set(k for k in stored if not k.endswith("_extra_state")) == set(renamed)
    before = {k: v.clone() for k, v in own.items()}
    try:
        with torch.no_grad():
            for te, local in renamed.items():
                own[local].copy_(stored[te])
        diff = (_logits(fp32_model, torch.tensor(IDS)) - reference["logits"]).abs().max().item()
    finally:
        with torch.no_grad():
            for k, v in before.items():
                own[k].copy_(v)
    assert diff <= 1e-4, diff
