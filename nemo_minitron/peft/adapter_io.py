"""LoRA adapters on disk: our adapter directory, merging into the base, and HF-PEFT export.

    from nemo_minitron.peft.adapter_io import merge_lora, export_peft
    merge_lora("base_hf_dir_or.nemo", "run.lora", "merged.nemo")   # or an HF output directory
    export_peft("run.lora", "run_peft")                            # peft's own format

An adapter directory (written by ``nemo-minitron finetune --peft lora``)::

    lora_config.json            rank, alpha, dropout, targets, the base architecture
    lora_weights.safetensors    full (unsharded) factors under Megatron names, fused layouts:
                                decoder.layers.N.self_attention.linear_qkv.lora_a  [r, hidden]
                                decoder.layers.N.self_attention.linear_qkv.lora_b  [(heads+2*groups)*head_dim, r]
                                decoder.layers.N.self_attention.linear_proj.lora_a [r, heads*head_dim]
                                decoder.layers.N.mlp.linear_fc1.lora_b             [2*ffn, r] ([gate ; up])
    adapter_config.json         the same adapters in HF-PEFT's format (``PeftModel.from_pretrained``
    adapter_model.safetensors   on the HF base model loads this directory as it is)

HF-PEFT format (peft 0.21: ``utils/constants.py`` names the files, ``get_peft_model_state_dict``
strips the adapter name, so keys are ``base_model.model.<HF module>.lora_A.weight``). A fused Megatron
adapter ``W x + s B A x`` on qkv becomes three PEFT adapters with the *same* A and B split into the
q/k/v rows by the grouped QKV layout (``mapping.QKV``); fc1 likewise into gate/up. The scale
``alpha / r`` is PEFT's default (no rsLoRA).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from nemo_minitron.config.arch import ModelConfig
from nemo_minitron.convert import mapping
from nemo_minitron.errors import CheckpointError, ConfigError
from nemo_minitron.peft import lora

CONFIG = "lora_config.json"
WEIGHTS = "lora_weights.safetensors"
PEFT_CONFIG = "adapter_config.json"  # peft.utils.constants.CONFIG_NAME
PEFT_WEIGHTS = "adapter_model.safetensors"  # peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
FORMAT = "nemo_minitron.lora/1"


def adapter_meta(cfg: ModelConfig, spec, base_model: Optional[str] = None) -> dict:
    return dict(format=FORMAT, target_modules=lora.resolve_targets(spec.target_modules),
                rank=spec.rank, alpha=float(spec.alpha), dropout=float(spec.dropout),
                base_model=base_model, model=cfg.to_dict())


def check_tensors(cfg: ModelConfig, meta: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Exactly the factors the config names, each of the shape the architecture implies."""
    want = {}
    for layer in range(cfg.num_layers):
        for target in meta["target_modules"]:
            out, inp = lora.full_shape(cfg, target)
            want[lora.adapter_key(layer, target, "a")] = (meta["rank"], inp)
            want[lora.adapter_key(layer, target, "b")] = (out, meta["rank"])
    problems = [f"missing {k}" for k in sorted(set(want) - set(tensors))][:4]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(want))][:4]
    problems += [f"{k}: {list(t.shape)}, expected {list(want[k])}"
                 for k, t in sorted(tensors.items()) if k in want and tuple(t.shape) != want[k]][:4]
    if problems:
        raise CheckpointError("LoRA adapter does not match the model: " + "; ".join(problems))


def save_adapter(tensors: Dict[str, torch.Tensor], meta: dict, out_dir: str,
                 overwrite: bool = False) -> str:
    """(one process) Write an adapter directory (ours + HF-PEFT), atomically."""
    from safetensors.torch import save_file

    from nemo_minitron.checkpoint.fsutil import atomic_output_dir

    cfg = ModelConfig.from_dict(meta["model"])
    check_tensors(cfg, meta, tensors)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(meta, f, indent=2)
        _write_peft(tensors, meta, tmp)
    return os.path.abspath(out_dir)


def read_adapter(adapter_dir: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    paths = [os.path.join(adapter_dir, n) for n in (CONFIG, WEIGHTS)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f"{adapter_dir} is not a LoRA adapter directory (written by "
                              f"nemo-minitron finetune --peft lora): {', '.join(missing)} missing")
    with open(paths[0]) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{paths[0]}: format {meta.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(paths[1])
    check_tensors(ModelConfig.from_dict(meta["model"]), meta, tensors)
    return meta, tensors


# ---- merge ---------------------------------------------------------------------------------------
def merge_into(full: Dict[str, torch.Tensor], cfg: ModelConfig, meta: dict,
               tensors: Dict[str, torch.Tensor]) -> None:
    """``W <- W + (alpha/r) B A`` in place on full Megatron tensors (fused layouts match: B's rows
    are ordered like W's), computed in fp32 and stored in W's dtype."""
    check_tensors(cfg, meta, tensors)
    scale = meta["alpha"] / meta["rank"]
    for layer in range(cfg.num_layers):
        for target in meta["target_modules"]:
            name = lora.base_weight_name(layer, target)
            a = tensors[lora.adapter_key(layer, target, "a")].float()
            b = tensors[lora.adapter_key(layer, target, "b")].float()
            full[name] = (full[name].float() + scale * (b @ a)).to(full[name].dtype)


def merge_lora(base: str, adapter_dir: str, out: str, overwrite: bool = False) -> str:
    """Base (HF dir or .nemo) + adapter directory -> merged model ``out`` (HF dir or .nemo)."""
    from nemo_minitron.model.save import save_full_model
    from nemo_minitron.model.source import ModelSource
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output, check_output_path

    check_output_path(out)
    check_disjoint({"--out": out}, {"--model": base, "--adapter": adapter_dir})
    check_output(out, "--out", overwrite=overwrite, kind="file" if out.endswith(".nemo") else "dir")
    meta, tensors = read_adapter(adapter_dir)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    with ModelSource(base) as source:  # an HF directory or a .nemo, read natively
        cfg = source.config
        check_tensors(cfg, meta, tensors)  # the adapter belongs to this architecture
        full = source.full_tensors()
    merge_into(full, cfg, meta, tensors)
    return save_full_model(full, cfg, out, base=base, overwrite=overwrite)


# ---- HF-PEFT -------------------------------------------------------------------------------------
def peft_tensors(cfg: ModelConfig, meta: dict, tensors: Dict[str, torch.Tensor]
                 ) -> Dict[str, torch.Tensor]:
    """Our fused adapters -> PEFT's per-module ``lora_A`` / ``lora_B`` tensors (HF names)."""
    out = {}
    for layer in range(cfg.num_layers):
        for target in meta["target_modules"]:
            a = tensors[lora.adapter_key(layer, target, "a")]
            b = tensors[lora.adapter_key(layer, target, "b")]
            # B's rows split like the base weight's (QKV groups -> q, k, v; [gate ; up])
            parts = mapping.rule_for(lora.base_weight_name(layer, target)).transform.split(cfg, b)
            for hf_module, b_part in zip(lora.TARGETS[target].hf, parts):
                prefix = f"base_model.model.model.layers.{layer}.{hf_module}"
                out[f"{prefix}.lora_A.weight"] = a.clone()  # one copy per module (safetensors)
                out[f"{prefix}.lora_B.weight"] = b_part.contiguous()
    return out


def peft_config(meta: dict, base_model: Optional[str] = None) -> dict:
    """``adapter_config.json`` fields of peft's LoraConfig that define this adapter."""
    modules = [m.split(".")[-1] for t in meta["target_modules"] for m in lora.TARGETS[t].hf]
    return dict(peft_type="LORA", task_type="CAUSAL_LM", r=meta["rank"],
                lora_alpha=meta["alpha"], lora_dropout=meta["dropout"], target_modules=modules,
                bias="none", fan_in_fan_out=False, use_rslora=False, init_lora_weights=True,
                inference_mode=True, modules_to_save=None,
                base_model_name_or_path=base_model or meta.get("base_model"))


def _write_peft(tensors, meta, out_dir, base_model=None):
    from safetensors.torch import save_file

    cfg = ModelConfig.from_dict(meta["model"])
    save_file(peft_tensors(cfg, meta, tensors), os.path.join(out_dir, PEFT_WEIGHTS),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
        json.dump(peft_config(meta, base_model), f, indent=2)


def export_peft(adapter_dir: str, out_dir: str, base_model: Optional[str] = None,
                overwrite: bool = False) -> str:
    """Write only the HF-PEFT files of ``adapter_dir`` to ``out_dir`` (``base_model``: the
    ``base_model_name_or_path`` to record, default the one the adapter was trained on).

    What is recorded must be loadable by transformers: an HF directory or a hub id. An adapter
    trained on a .nemo records that .nemo (which transformers cannot load), so
    then ``base_model`` is required (the hub id, e.g. nvidia/Llama-3.1-Minitron-4B-Width-Base,
    or the directory ``nemo-minitron convert nemo-to-hf`` wrote): a one-line error says so."""
    from nemo_minitron.checkpoint.fsutil import atomic_output_dir
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output
    from nemo_minitron.convert.io import is_nemo

    check_disjoint({"--out": out_dir}, {"--adapter": adapter_dir})
    check_output(out_dir, "--out", overwrite=overwrite, kind="dir")
    meta, tensors = read_adapter(adapter_dir)
    base = base_model or meta.get("base_model")
    if not base or is_nemo(base):
        what = (f"--base-model {base} is a .nemo" if base_model else
                f"the adapter's base {base} is a .nemo" if base else "the adapter records no base")
        raise ConfigError(f"{what}, which transformers cannot load; pass --base-model with an HF "
                          "checkpoint directory or hub id (e.g. the directory `nemo-minitron "
                          "convert nemo-to-hf` wrote)")
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        _write_peft(tensors, meta, tmp, base_model)
    return os.path.abspath(out_dir)


# ---- the end of a LoRA training run --------------------------------------------------------------
def merged_weights(model):
    """``model.save.Adjust`` that adds each targeted weight's LoRA update ``(alpha/r) B A`` to this
    rank's shard of it, in fp32, stored in the weight's dtype (as :func:`merge_into` does on full
    tensors). Each rank's own factors give its shard of the update: column-parallel ``B_r A``
    (rows), row-parallel ``B A_r`` (columns). The model itself is not changed."""
    deltas = {}
    for name, module in model.named_modules():
        adapter = getattr(module, lora.ADAPTER, None)
        if isinstance(adapter, lora.LoRAAdapter):
            deltas[mapping.te_spec_name(f"{name}.weight")] = adapter

    def adjust(name: str, weight: torch.Tensor) -> torch.Tensor:
        adapter = deltas.get(name)
        if adapter is None:
            return weight
        delta = adapter.lora_b.detach().float() @ adapter.lora_a.detach().float()
        return (weight.float() + adapter.scale * delta).to(weight.dtype)
    return adjust


def save_lora_outputs(model, cfg: ModelConfig, spec, adapter_dir: str, out: Optional[str],
                      base_dir: Optional[str] = None, base_name: Optional[str] = None,
                      overwrite: bool = False, nemo_dir: bool = False
                      ) -> Tuple[Optional[str], Optional[str]]:
    """Collective. Write the adapter directory and, if ``out``, the merged model (written like any
    job's model: ``model.save.save_model``); returns the two paths on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from nemo_minitron.model.save import save_model

    adapters = lora.gather_adapters(model)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    adapter_path = None
    if rank0:
        adapter_path = save_adapter(adapters, adapter_meta(cfg, spec, base_name), adapter_dir,
                                    overwrite=overwrite)
    merged = None
    if out:
        merged = save_model(model, cfg, out, base=base_dir, overwrite=overwrite,
                            nemo_dir=nemo_dir, adjust=merged_weights(model))
    if dist.is_initialized():
        dist.barrier()
    return (adapter_path, merged) if rank0 else (None, None)
