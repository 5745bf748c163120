"""Knowledge distillation of a (pruned) student from a frozen teacher, Minitron-style, on Megatron-Core.

    nemo-minitron distill --teacher TEACHER_HF_DIR --student STUDENT_HF_DIR --data DATA --out OUT_DIR \\
        [--config llama31_8b_to_minitron_4b_width] [trainer.max_steps=20 ...]

    # the same recipe under a launcher (one process per GPU; srun works the same way):
    torchrun --nproc-per-node 8 recipes/distill.py --config llama31_8b_to_minitron_4b_width \\
        teacher.restore_from_path=TEACHER model.restore_from_path=STUDENT \\
        data.train_ds.file_path=DATA out=OUT_DIR

DATA: ``pydoc`` (CPython's documentation, for demos), a ``.txt`` file or a JSONL with ``text``
(pretraining-style, loss on every token), or NeMo SFT JSONL with ``input``/``output`` (loss on the
answer). Loss: forward KL(teacher || student) on logits at temperature ``kd.temperature`` (1), LM
loss off (``kd.lm_weight`` > 0 mixes it in; ``kd.loss=reverse_kl`` swaps the KL). Validation
reports the KL and the student's LM loss. TP, PP and DP: under PP the teacher gets the student's
pipeline layout (each stage holds both models' layers; the last stage computes both logits; see
nemo_minitron/train/distill.py). ``kd.hidden_pairs`` adds hidden-state cosine losses between chosen
layers (nemo_minitron/losses/hidden.py; PP=1 only).

Instead of DATA, Megatron indexed datasets (``nemo-minitron preprocess``):
``data.data_prefix=[w1,prefix1,w2,prefix2]`` with ``data.splits_string=99,1,0`` for validation
(pretraining-style, loss on every token; nemo_minitron/data/pretrain.py).

Skeleton: load config -> setup (parallel state, teacher, student, data, optimizer) -> the one
training loop (nemo_minitron.train.loop.Trainer with distillation hooks) -> save the student as an
HF checkpoint -> cleanup. Resumes from the newest checkpoint in ``trainer.ckpt_dir`` (default
``OUT.ckpt``) when that run was started from the same teacher, student, data and settings
(``run.json``; nemo_minitron/train/resume.py), else refuses (``trainer.resume=false`` starts over);
checkpoints hold the student and its optimizer only, the teacher is never written.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def load_recipe_config(config_path: Optional[str], overrides: List[str], values=None):
    from nemo_minitron.config.recipe import load_config
    from nemo_minitron.train.config import DistillConfig

    return load_config(DistillConfig, config_path, overrides, values=values, kind="distill")


def validate(cfg, overwrite: bool = False) -> None:
    """Everything that can be checked before any process group or model exists: the config, the
    outputs (given, not existing unless ``overwrite``, writable, never an input or inside one) and
    the data (UTF-8, JSONL with the fields its format needs)."""
    from nemo_minitron.errors import ConfigError
    from nemo_minitron.model.attention import check_attention_backend
    from nemo_minitron.train.distill import check_kd
    from nemo_minitron.checkpoint.paths import check_output_path
    from nemo_minitron.data.pretrain import check_data_source
    from nemo_minitron.train.optim import check_optim

    check_output_path(cfg.out, cfg.out_format)
    if not cfg.teacher.restore_from_path:
        raise ConfigError("no teacher given (--teacher / teacher.restore_from_path)")
    if not cfg.model.restore_from_path:
        raise ConfigError("no student given (--student / model.restore_from_path)")
    check_data_source(cfg.data)
    if cfg.trainer.max_steps < 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be >= 0")
    check_kd(cfg.kd)
    check_optim(cfg.optim)
    check_attention_backend(cfg.model.attention_backend)
    check_paths(cfg, overwrite)


def outputs(cfg) -> dict:
    from nemo_minitron.train.loop import default_ckpt_dir

    return {"--out": cfg.out, "trainer.ckpt_dir": cfg.trainer.ckpt_dir or default_ckpt_dir(cfg.out)}


def inputs(cfg) -> dict:
    from nemo_minitron.train.resume import data_inputs

    return {"--teacher": cfg.teacher.restore_from_path, "--student": cfg.model.restore_from_path,
            **data_inputs(cfg.data)}


def check_paths(cfg, overwrite: bool = False) -> None:
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output
    from nemo_minitron.data.training import check_data_files

    out = outputs(cfg)
    check_disjoint(out, inputs(cfg))
    check_output(cfg.out, "--out", overwrite=overwrite,
                 kind="file" if cfg.out.endswith(".nemo") else "dir")
    check_output(out["trainer.ckpt_dir"], "trainer.ckpt_dir", overwrite=True, kind="dir")
    check_data_files(cfg.data)


def identity(cfg) -> dict:
    """What this run starts from (nemo_minitron/train/resume.py): teacher, student, data and the
    settings that change the run; call it with the paths as the user gave them."""
    from nemo_minitron.train.resume import run_identity

    return run_identity("distill", cfg, inputs(cfg))


def check_resume(cfg, ident: dict) -> None:
    from nemo_minitron.train.resume import check_resume as check

    check(outputs(cfg)["trainer.ckpt_dir"], ident, cfg.trainer.resume)


def setup_data(cfg, model_cfg, tokenizer_dir: Optional[str] = None):
    """Tokenize train (and validation) data with the student's tokenizer (checked equal to the
    teacher's); all data errors surface here, before training."""
    from nemo_minitron.data.training import build_datasets

    return build_datasets(cfg.data, tokenizer_dir or cfg.model.restore_from_path, model_cfg,
                          seed=cfg.trainer.seed)


def setup(cfg, teacher_src, student_src, ident: Optional[dict] = None):
    """``teacher_src``, ``student_src``: open ``model.source.ModelSource``s (HF dirs or .nemo)."""
    from nemo_minitron.config.parallel import validate_parallel
    from nemo_minitron.config.recipe import to_dict
    from nemo_minitron.dist import init_megatron, launched_world_size
    from nemo_minitron.losses.hidden import HiddenDistillation, check_hidden
    from nemo_minitron.train.distill import (LogitDistillation, build_teacher, check_same_tokenizer,
                                             kd_metric_names)
    from nemo_minitron.train.loop import Trainer, recipe_loop
    from nemo_minitron.train.model import build_train_model
    from nemo_minitron.train.optim import build_optimizer, build_scheduler, wrap_ddp

    t, m = cfg.trainer, cfg.model
    student_cfg, teacher_cfg = student_src.config, teacher_src.config  # no weight read yet
    check_same_tokenizer(teacher_src.tokenizer_dir, teacher_cfg, student_src.tokenizer_dir,
                         student_cfg)
    world = launched_world_size()  # python, torchrun or srun
    for c in (teacher_cfg, student_cfg):
        validate_parallel(c, t.tensor_model_parallel_size, t.pipeline_model_parallel_size,
                          world_size=world)
    check_hidden(cfg.kd, student_layers=student_cfg.num_layers,
                 teacher_layers=teacher_cfg.num_layers,
                 pp=t.pipeline_model_parallel_size, recompute=m.activations_checkpoint_granularity)
    fmt, train_data, val_data = setup_data(cfg, student_cfg, student_src.tokenizer_dir)
    init_megatron(tp=t.tensor_model_parallel_size, pp=t.pipeline_model_parallel_size, seed=t.seed)
    teacher = build_teacher(teacher_cfg, teacher_src,
                            precision=cfg.teacher.precision or t.precision, seed=t.seed,
                            attention_backend=m.attention_backend)
    student = build_train_model(student_cfg, precision=t.precision, hf_dir=student_src,
                                seed=t.seed, recompute=m.activations_checkpoint_granularity,
                                recompute_num_layers=m.activations_checkpoint_num_layers,
                                attention_backend=m.attention_backend)
    # before the DDP wrap: a learned projection (widths differ) joins the student's parameters
    hidden = HiddenDistillation(student, teacher, cfg.kd, seed=t.seed) if cfg.kd.hidden_pairs \
        else None
    ddp = wrap_ddp(student, use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
    optimizer = build_optimizer(ddp, cfg.optim, t.precision)
    scheduler = build_scheduler(cfg.optim, t.max_steps)
    loop, logger = recipe_loop(cfg, extra_columns=kd_metric_names(cfg.kd))
    logger.info(f"distill: {len(train_data)} training rows ({fmt}) of {cfg.data.seq_length} "
                f"positions, {cfg.kd.loss} T={cfg.kd.temperature:g} kd_weight={cfg.kd.kd_weight:g} "
                f"lm_weight={cfg.kd.lm_weight:g}"
                + (f", hidden pairs {cfg.kd.hidden_pairs} x{cfg.kd.hidden_weight:g}" if hidden else "")
                + f", TP={t.tensor_model_parallel_size} PP={t.pipeline_model_parallel_size} "
                f"DP={world // (t.tensor_model_parallel_size * t.pipeline_model_parallel_size)}, "
                f"checkpoints in {loop.ckpt_dir}")
    kd = LogitDistillation(teacher, cfg.kd, vocab_size=student_cfg.vocab_size, hidden=hidden)
    trainer = Trainer(ddp, optimizer, scheduler, train_data, loop, val_data=val_data, logger=logger,
                      forward_step=kd.forward_step, loss_fn=kd.loss_fn,
                      metric_names=kd_metric_names(cfg.kd), pipeline_io=kd,
                      extra_state={"config": to_dict(cfg)}, identity=ident)
    return trainer, student, student_cfg, logger


def run(cfg, overwrite: bool = False, before_fit=None, ident: Optional[dict] = None):
    """Distill and write the student; returns the trainer state (every rank).

    ``before_fit(trainer)``: called once everything is set up, before the first step (the demo
    measures the held-out KL of the undistilled student there with ``trainer.validate()``).
    ``ident``: the run's identity, already checked by :func:`main` (else checked here)."""
    from nemo_minitron.dist import destroy_megatron
    from nemo_minitron.losses.hidden import without_projection
    from nemo_minitron.model.source import ModelSource
    from nemo_minitron.train.export import save_final_output

    if ident is None:
        validate(cfg, overwrite)
        ident = identity(cfg)
        check_resume(cfg, ident)
    # HF directories or .nemo files, read natively (each rank its own part)
    with ModelSource(cfg.teacher.restore_from_path) as teacher_src, \
            ModelSource(cfg.model.restore_from_path) as student_src:
        trainer, student, student_cfg, logger = setup(cfg, teacher_src, student_src, ident)
        try:
            if before_fit is not None:
                before_fit(trainer)
            state = trainer.fit()
            state.val_metrics = trainer.last_val_metrics
            with without_projection(student):  # a hidden-loss projection is training state only
                path = save_final_output(student, student_cfg, cfg.out,
                                         base_dir=student_src.files_dir, overwrite=overwrite,
                                         nemo_dir=cfg.out_format == "nemo_dir")
            if path:
                logger.info(f"wrote {path}")
        finally:
            logger.close()
            destroy_megatron()
    return state


def main(argv: Optional[List[str]] = None, before_fit=None) -> int:
    from nemo_minitron.config.recipe import without_none
    from nemo_minitron.errors import exit_status

    parser = argparse.ArgumentParser(prog="nemo-minitron distill",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="recipe YAML (sections trainer/model/teacher/kd/data/optim)")
    parser.add_argument("--teacher", help="frozen teacher: HF dir or .nemo "
                                          "(teacher.restore_from_path)")
    parser.add_argument("--student", help="student: HF dir or .nemo, e.g. the pruning "
                                          "output (model.restore_from_path)")
    parser.add_argument("--data", help="pydoc, .txt, JSONL text or SFT (data.train_ds.file_path)")
    parser.add_argument("--out", help="the distilled student: HF checkpoint dir, or a "
                                      ".nemo (out)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. kd.temperature=2")
    args = parser.parse_args(argv)
    flags = {"teacher": {"restore_from_path": args.teacher},
             "model": {"restore_from_path": args.student},
             "data": {"train_ds": {"file_path": args.data}}, "out": args.out}

    def body():
        cfg = load_recipe_config(args.config, args.overrides, values=without_none(flags))
        validate(cfg, args.overwrite)  # before the teacher or student is opened
        ident = identity(cfg)  # the paths as given
        check_resume(cfg, ident)
        run(cfg, overwrite=args.overwrite, before_fit=before_fit, ident=ident)
    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
