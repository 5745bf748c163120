"""SFT of a Llama-3.1 / Minitron checkpoint with Megatron-Core (TP, PP, DP): full or LoRA.

    nemo-minitron finetune --model BASE_HF_DIR --data TRAIN.jsonl --out OUT_DIR \\
        [--config minitron_4b_width_sft] [trainer.max_steps=20 ...]

    # continued pretraining on Megatron indexed datasets (nemo-minitron preprocess) instead of --data:
    nemo-minitron finetune --model BASE --out OUT data.splits_string=99,1,0 \\
        'data.data_prefix=[0.7,web_text_document,0.3,code_text_document]'
    # Minitron's teacher correction: the same recipe on pretraining-style text (data.format: text,
    # loss on every token; docs/minitron_pipeline.md)
    nemo-minitron finetune --config teacher_correction_tiny --model TEACHER \\
        --data pydoc --out TEACHER_CORRECTED
    # LoRA (base frozen): adapters to OUT.lora/ (ours + HF-PEFT), base + adapters merged to OUT
    nemo-minitron finetune --peft lora --config minitron_4b_width_lora \\
        --model BASE(.nemo or HF dir) --data TRAIN.jsonl --out OUT.nemo [lora.rank=8 ...]

    # the same recipe under a launcher (one process per GPU; srun works the same way):
    torchrun --nproc-per-node 8 recipes/finetune.py --config minitron_4b_width_sft \\
        model.restore_from_path=BASE data.train_ds.file_path=TRAIN.jsonl out=OUT_DIR

Skeleton: load config -> setup (parallel state, model, data, optimizer) -> train loop -> save the
final HF checkpoint -> cleanup. Everything reusable lives in ``nemo_minitron.train``; this file
only wires it. Resumes from the newest checkpoint in ``trainer.ckpt_dir`` (default ``OUT.ckpt``)
when the run there was started from the same inputs (``run.json``; nemo_minitron/train/resume.py),
else refuses: ``trainer.resume=false`` starts over.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def load_recipe_config(config_path: Optional[str], overrides: List[str], values=None):
    from nemo_minitron.config.recipe import load_config
    from nemo_minitron.train.config import FinetuneConfig

    return load_config(FinetuneConfig, config_path, overrides, values=values, kind="finetune")


def validate(cfg, overwrite: bool = False) -> None:
    """Everything that can be checked before any process group or model exists: the config, the
    outputs (given, not existing unless ``overwrite``, writable, never an input or inside one) and
    the data (UTF-8 JSONL with the fields its format needs)."""
    from nemo_minitron.errors import ConfigError
    from nemo_minitron.model.attention import check_attention_backend
    from nemo_minitron.checkpoint.paths import check_output_path
    from nemo_minitron.data.pretrain import check_data_source
    from nemo_minitron.train.optim import check_optim

    check_output_path(cfg.out, cfg.out_format)
    if not cfg.model.restore_from_path:
        raise ConfigError("no base model given (--model / model.restore_from_path)")
    check_data_source(cfg.data)
    if cfg.trainer.max_steps < 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be >= 0")
    if cfg.peft not in ("none", "lora"):
        raise ConfigError(f"peft={cfg.peft!r} must be one of none, lora")
    check_optim(cfg.optim)
    check_attention_backend(cfg.model.attention_backend)
    if cfg.peft == "lora":
        from nemo_minitron.peft.lora import check_spec

        check_spec(cfg.lora)  # e.g. a target that does not exist: before any model is built
    check_paths(cfg, overwrite)


def outputs(cfg) -> dict:
    """Flag -> path of everything the run writes (the merged model only when it is written)."""
    from nemo_minitron.train.loop import default_ckpt_dir

    lora = cfg.peft == "lora"
    return {"--out": cfg.out if not lora or cfg.lora.merge else None,
            "lora.adapter_dir": adapter_dir(cfg) if lora else None,
            "trainer.ckpt_dir": cfg.trainer.ckpt_dir or default_ckpt_dir(cfg.out)}


def inputs(cfg) -> dict:
    """Flag -> path of everything the run reads."""
    from nemo_minitron.train.resume import data_inputs

    return {"--model": cfg.model.restore_from_path, **data_inputs(cfg.data)}


def check_paths(cfg, overwrite: bool = False) -> None:
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output
    from nemo_minitron.data.training import check_data_files

    out = outputs(cfg)
    check_disjoint(out, inputs(cfg))
    if out["--out"]:
        check_output(cfg.out, "--out", overwrite=overwrite,
                     kind="file" if cfg.out.endswith(".nemo") else "dir")
    if out["lora.adapter_dir"]:
        check_output(out["lora.adapter_dir"], "lora.adapter_dir", overwrite=overwrite, kind="dir")
    check_output(out["trainer.ckpt_dir"], "trainer.ckpt_dir", overwrite=True, kind="dir")
    check_data_files(cfg.data)


def identity(cfg) -> dict:
    """What this run starts from (nemo_minitron/train/resume.py): recorded with its checkpoints,
    compared on resume: the paths as the user gave them."""
    from nemo_minitron.train.resume import run_identity

    return run_identity("finetune", cfg, inputs(cfg))


def check_resume(cfg, ident: dict) -> None:
    from nemo_minitron.train.resume import check_resume as check

    check(outputs(cfg)["trainer.ckpt_dir"], ident, cfg.trainer.resume)


def adapter_dir(cfg) -> str:
    """Where a LoRA run writes its adapters: ``lora.adapter_dir``, default ``<out>.lora``."""
    out = os.path.abspath(cfg.out).rstrip("/")
    return cfg.lora.adapter_dir or (out[:-len(".nemo")] if out.endswith(".nemo") else out) + ".lora"


def setup_data(cfg, model_cfg, tokenizer_dir: Optional[str] = None):
    """Tokenize train (and validation) data: SFT JSONL (``data.format: sft``, loss on the answer)
    or pretraining-style text (``text``: pydoc, .txt, JSONL ``text``; loss on every token, as in
    teacher correction), or the indexed datasets of ``data.data_prefix``; all data errors surface here, before training."""
    from nemo_minitron.data.training import build_datasets

    return build_datasets(cfg.data, tokenizer_dir or cfg.model.restore_from_path, model_cfg,
                          seed=cfg.trainer.seed)


def setup(cfg, base, ident: Optional[dict] = None):
    """``base``: the base model, an open ``model.source.ModelSource`` (HF directory or .nemo)."""
    from nemo_minitron.config.parallel import validate_parallel
    from nemo_minitron.dist import init_megatron, launched_world_size
    from nemo_minitron.config.recipe import to_dict
    from nemo_minitron.train.loop import Trainer, recipe_loop
    from nemo_minitron.train.model import build_train_model
    from nemo_minitron.train.optim import build_optimizer, build_scheduler, wrap_ddp

    t, m = cfg.trainer, cfg.model
    model_cfg = base.config  # no weight read yet
    world = launched_world_size()  # python, torchrun or srun
    validate_parallel(model_cfg, t.tensor_model_parallel_size, t.pipeline_model_parallel_size,
                      world_size=world)
    fmt, train_data, val_data = setup_data(cfg, model_cfg, base.tokenizer_dir)
    init_megatron(tp=t.tensor_model_parallel_size, pp=t.pipeline_model_parallel_size, seed=t.seed)
    lora = cfg.peft == "lora"
    model = build_train_model(model_cfg, precision=t.precision, hf_dir=base,
                              seed=t.seed, recompute=m.activations_checkpoint_granularity,
                              recompute_num_layers=m.activations_checkpoint_num_layers,
                              use_te=False if lora else None,
                              attention_backend=m.attention_backend)
    if lora:  # freezes the base: DDP and the optimizer see only the adapters
        from nemo_minitron.peft.lora import apply_lora

        apply_lora(model, model_cfg, cfg.lora, seed=t.seed)
    ddp = wrap_ddp(model, use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
    optimizer = build_optimizer(ddp, cfg.optim, t.precision)
    scheduler = build_scheduler(cfg.optim, t.max_steps)
    loop, logger = recipe_loop(cfg)
    logger.info(f"finetune: {len(train_data)} training rows ({fmt}) of {cfg.data.seq_length} "
                f"positions, "
                f"TP={t.tensor_model_parallel_size} PP={t.pipeline_model_parallel_size} "
                f"DP={world // (t.tensor_model_parallel_size * t.pipeline_model_parallel_size)}, "
                f"{_trainable(model)} trainable parameters on this rank, "
                f"checkpoints in {loop.ckpt_dir}")
    trainer = Trainer(ddp, optimizer, scheduler, train_data, loop, val_data=val_data, logger=logger,
                      extra_state={"config": to_dict(cfg)}, identity=ident)
    return trainer, model, model_cfg, logger


def _trainable(model) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{n:,} of {sum(p.numel() for p in model.parameters()):,}"


def run(cfg, overwrite: bool = False, base_name: Optional[str] = None,
        ident: Optional[dict] = None):
    """Train and write the final outputs; returns the trainer state (every rank). ``base_name``:
    the base model as the user named it (recorded in a LoRA adapter's config). ``ident``: the
    run's identity, already checked by :func:`main` (else validated and checked here)."""
    from nemo_minitron.dist import destroy_megatron
    from nemo_minitron.model.source import ModelSource
    from nemo_minitron.train.export import save_final_output

    if ident is None:
        validate(cfg, overwrite)
        ident = identity(cfg)
        check_resume(cfg, ident)
    with ModelSource(cfg.model.restore_from_path) as base:  # HF directory or .nemo, read natively
        trainer, model, model_cfg, logger = setup(cfg, base, ident)
        try:
            state = trainer.fit()
            if cfg.peft == "lora":
                from nemo_minitron.peft.adapter_io import save_lora_outputs

                paths = save_lora_outputs(model, model_cfg, cfg.lora, adapter_dir(cfg),
                                          cfg.out if cfg.lora.merge else None,
                                          base_dir=base.files_dir,
                                          base_name=base_name or cfg.model.restore_from_path,
                                          overwrite=overwrite,
                                          nemo_dir=cfg.out_format == "nemo_dir")
            else:
                paths = (save_final_output(model, model_cfg, cfg.out,
                                           base_dir=base.files_dir, overwrite=overwrite,
                                           nemo_dir=cfg.out_format == "nemo_dir"),)
            for path in paths:
                if path:
                    logger.info(f"wrote {path}")
        finally:
            logger.close()
            destroy_megatron()
    return state


def main(argv: Optional[List[str]] = None) -> int:
    from nemo_minitron.errors import exit_status
    from nemo_minitron.config.recipe import without_none

    parser = argparse.ArgumentParser(prog="nemo-minitron finetune",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="recipe YAML (sections trainer/model/data/optim)")
    parser.add_argument("--model", help="base model: HF checkpoint dir or .nemo "
                                        "(model.restore_from_path)")
    parser.add_argument("--data", help="training data (data.train_ds.file_path): SFT JSONL, or "
                                       "with data.format=text pydoc, .txt or JSONL text")
    parser.add_argument("--out", help="output: HF checkpoint dir or .nemo (out)")
    parser.add_argument("--peft", choices=("none", "lora"), help="lora: train adapters only (peft)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. trainer.max_steps=20")
    args = parser.parse_args(argv)
    # --model/--data/--out are overrides too, kept as strings (a path is never YAML-typed)
    flags = {"model": {"restore_from_path": args.model}, "data": {"train_ds": {"file_path": args.data}},
             "out": args.out, "peft": args.peft}

    def body():
        cfg = load_recipe_config(args.config, args.overrides, values=without_none(flags))
        validate(cfg, args.overwrite)  # before the base model is opened
        ident = identity(cfg)  # the paths as given
        check_resume(cfg, ident)
        base_name = cfg.model.restore_from_path  # as recorded in a LoRA adapter's config
        if base_name and os.path.exists(base_name):
            base_name = os.path.abspath(base_name)
        run(cfg, overwrite=args.overwrite, base_name=base_name, ident=ident)
    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
