"""nemo-minitron prune --config tiny --model TEACHER_HF_DIR --out STUDENT_DIR

Minitron pruning: a Llama-3.1 teacher -> a width- and/or depth-pruned student. Also
``python recipes/prune.py ...`` (same arguments) and, with the importance pass parallelized,
``torchrun --nproc-per-node 8 recipes/prune.py --config minitron_4b_width
--model TEACHER --data CALIB.jsonl --out STUDENT tp=8`` (any ``key=value`` overrides a config field),
or the same under ``srun`` with one task per GPU (ranks from nemo_minitron.dist).

Steps: load config (PruneConfig defaults < --config YAML < key=value) -> setup (teacher config,
target, calibration samples: every input error happens here, before any model is built) -> run
(the importance pass with Megatron forward hooks at TP x PP x DP, or a saved scores file) -> save
(rank 0: rankings, sliced weights, the student checkpoint with pruning.json and importance.pt)
-> cleanup. The student's config is exactly the target; see nemo_minitron/prune/ for the method.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from nemo_minitron.config.recipe import load_config, to_dict
from nemo_minitron.dist import is_rank0, launched_world_size
from nemo_minitron.errors import CheckpointError, ConfigError, exit_status
from nemo_minitron.prune.config import PruneConfig


def log(msg: str) -> None:
    if is_rank0():
        print(f"[prune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _target_overrides(cfg: PruneConfig) -> dict:
    from nemo_minitron.prune.targets import PRUNABLE

    out = {k: getattr(cfg, k) for k in PRUNABLE}
    out["drop_layers"] = cfg.drop_layers
    return out


# ---- setup: every input error before any model is built ----------------------------------------
def setup(cfg: PruneConfig) -> dict:
    """Check the output, open the teacher (an HF directory or a .nemo, read natively: each rank
    reads its own stage, nothing converted), then :func:`_setup_teacher`."""
    from nemo_minitron.model.source import ModelSource
    from nemo_minitron.prune.depth import DEPTH_METRICS

    if cfg.depth_metric not in DEPTH_METRICS:
        raise ConfigError(f"depth_metric={cfg.depth_metric!r} is not one of "
                          f"{', '.join(DEPTH_METRICS)}")
    check_paths(cfg)
    try:
        source = ModelSource(cfg.model)
    except CheckpointError as e:
        raise CheckpointError(f"model={e}") from None
    try:
        state = _setup_teacher(cfg, source)
    except BaseException:
        source.close()
        raise
    state["source"] = source
    return state


def check_paths(cfg: PruneConfig) -> None:
    """The student can be written (never over or inside an input) and the calibration text is
    UTF-8 (JSONL with "text"), before any weight is read."""
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output
    from nemo_minitron.data.calibration import BUILTIN
    from nemo_minitron.data.jsonl import check_data_file

    check_disjoint({"out": cfg.out}, {"model": cfg.model, "data": cfg.data, "scores": cfg.scores,
                                      "tokenizer": cfg.tokenizer})
    check_output(cfg.out, "--out", overwrite=cfg.overwrite,
                 kind="file" if cfg.out.endswith(".nemo") else "dir")
    if not cfg.scores and cfg.data != BUILTIN:
        check_data_file(cfg.data, "data", ("text",))


def _check_target(cfg: PruneConfig, teacher):
    """(layout, target) of ``teacher``'s config: the parallel layout and the pruning target."""
    from nemo_minitron.config.parallel import validate_parallel
    from nemo_minitron.prune.targets import resolve_target

    world = launched_world_size()  # python, torchrun or srun
    layout = validate_parallel(teacher, cfg.tp, cfg.pp, world)
    return layout, resolve_target(teacher, cfg.target, _target_overrides(cfg), tp=cfg.tp)


def _setup_teacher(cfg: PruneConfig, source) -> dict:
    from nemo_minitron.data.calibration import calibration_samples
    from nemo_minitron.prune.importance import load_scores

    teacher = source.config  # layout and target from the config alone, before any weight
    layout, target = _check_target(cfg, teacher)
    reader = source.hf_getter()
    log(f"teacher {cfg.model}: {teacher.num_params():,} parameters; target: layers "
        f"{target.config.num_layers}, hidden {target.config.hidden_size}, ffn "
        f"{target.config.ffn_hidden_size}, heads {target.config.num_attention_heads} "
        f"({target.config.num_query_groups} groups), head_dim {target.config.head_dim}: "
        f"{target.config.num_params():,} parameters")
    state = dict(teacher=teacher, reader=reader, target=target, layout=layout, samples=None,
                 scores=None)
    depth_by_loss = (target.drop_layers is None and cfg.depth_metric == "loss"
                     and target.config.num_layers < teacher.num_layers)
    state["block_lengths"] = [teacher.num_layers - target.config.num_layers] if depth_by_loss else []
    if cfg.scores:
        state["scores"] = load_scores(cfg.scores, teacher)
        log(f"scores from {cfg.scores} (no forward pass)")
        return state
    samples = calibration_samples(cfg.data, cfg.tokenizer or source.tokenizer_dir, cfg.calib_samples,
                                  cfg.seq_length, teacher.bos_token_id,
                                  teacher.eos_token_id if isinstance(teacher.eos_token_id, int)
                                  else teacher.eos_token_id[0])
    if cfg.calib_samples < layout.dp:
        raise ConfigError(f"calib_samples={cfg.calib_samples} cannot feed {layout.dp} "
                          "data-parallel replicas")
    state["samples"] = samples
    log(f"calibration: {samples.shape[0]} samples x {cfg.seq_length} tokens from {cfg.data}")
    return state


# ---- run: the importance pass -------------------------------------------------------------------
def run(cfg: PruneConfig, state: dict) -> dict:
    from megatron.core import parallel_state as ps

    from nemo_minitron.dist import init_megatron
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.prune.importance import compute_scores, scores_file_content

    if state["scores"] is not None:
        return state["scores"]
    if not ps.model_parallel_is_initialized():
        init_megatron(tp=cfg.tp, pp=cfg.pp, seed=cfg.seed)
        state["owns_megatron"] = True
    elif (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) \
            != (cfg.tp, cfg.pp):
        raise ConfigError(f"Megatron is already initialized with another layout than "
                          f"tp={cfg.tp} pp={cfg.pp}")
    teacher = state["teacher"]
    # local spec (use_te=False): its RMSNorms are modules whose outputs the hooks can see; no
    # random init of the weights the strict load fills next
    model = build_gpt_model(teacher, dtype=cfg.dtype, use_te=False, init_weights=False)
    state["source"].load_into(model, teacher)  # this rank's stage and TP shard
    log(f"teacher loaded at TP={cfg.tp} PP={cfg.pp} DP={state['layout'].dp}, dtype {cfg.dtype}")
    scores = compute_scores(model, teacher, state["samples"], micro_batch_size=cfg.micro_batch_size,
                            block_lengths=state["block_lengths"], progress=log)
    calibration = dict(data=cfg.data, samples=cfg.calib_samples, seq_length=cfg.seq_length,
                       dtype=cfg.dtype, tp=cfg.tp, pp=cfg.pp, dp=state["layout"].dp)
    return scores_file_content(scores, teacher, calibration)


# ---- save: rank 0 writes the student ----------------------------------------------------------
def save(cfg: PruneConfig, state: dict, scores: dict) -> Optional[str]:
    import torch

    from nemo_minitron.prune.importance import save_scores
    from nemo_minitron.prune.prune import prune_tensors, rankings, write_json, write_student

    path, tensors, extra, target = None, None, None, state["target"]
    if is_rank0():
        teacher = state["teacher"]
        plan = rankings(scores, teacher, target, cfg.depth_metric)
        log(f"keeping layers {plan['layers']}" if plan["dropped_layers"] else "keeping all layers")
        tensors = prune_tensors(state["reader"], teacher, target.config, plan)
        meta = dict(plan, config=to_dict(cfg), student=target.config.to_dict())
        extra = {"pruning.json": write_json(meta),
                 "importance.pt": lambda p: save_scores(p, scores)}
    if is_rank0() or cfg.out.endswith(".nemo"):  # every rank saves a .nemo (tensors on rank 0)
        path = write_student(cfg.out, target.config, tensors, state["source"].files_dir,
                             overwrite=cfg.overwrite, extra=extra)
    if path is not None:
        log(f"wrote {path}: {target.config.num_params():,} parameters")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank leaves before the student exists
    return path


def cleanup(state: dict) -> None:
    if state.get("source") is not None:
        state["source"].close()
    if state.get("owns_megatron"):
        from nemo_minitron.dist import destroy_megatron

        destroy_megatron()


def parse_args(argv: Optional[List[str]] = None) -> PruneConfig:
    parser = argparse.ArgumentParser(prog="nemo-minitron prune", description="Minitron width/depth pruning (recipes/prune.py)")
    parser.add_argument("--config", help="YAML with PruneConfig fields or a shipped name (nemo-minitron configs prune)")
    parser.add_argument("--model", help="teacher: HF checkpoint directory or .nemo (same as "
                                        "model=...)")
    parser.add_argument("--data", help="calibration data: pydoc (built in), .txt or JSONL with "
                                       "\"text\" (same as data=...)")
    parser.add_argument("--out", help="student output: HF checkpoint directory or .nemo "
                                      "(same as out=...)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace an existing --out (same as overwrite=true)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="any PruneConfig field, e.g. target=minitron_4b_width tp=2")
    args = parser.parse_intermixed_args(argv)  # key=value may come before or after options
    flags = {k: v for k in ("model", "data", "out", "overwrite")
             if (v := getattr(args, k)) is not None}
    return load_config(PruneConfig, args.config, args.overrides, values=flags, kind="prune")


def main(argv: Optional[List[str]] = None) -> int:
    state = {}

    def body():
        cfg = parse_args(argv)
        state.update(setup(cfg))
        save(cfg, state, run(cfg, state))
    try:
        return exit_status(body)
    finally:
        cleanup(state)


if __name__ == "__main__":
    sys.exit(main())
