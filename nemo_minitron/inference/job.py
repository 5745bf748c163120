"""The generate and eval-ppl jobs: config -> checks -> setup -> run -> write -> cleanup.

Shared by ``recipes/generate.py`` and the ``nemo-minitron generate`` / ``eval-ppl`` commands, so
both run the same code under ``python``, ``torchrun`` and ``srun``. Every rank of the model-parallel
group runs the job; only rank 0 prints or writes. Everything that can be checked without the model
(config keys, files, prompts, parallel layout, sampling knobs) is checked first, before
torch.distributed or any weight is touched, and fails as one :class:`MinitronError` line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from nemo_minitron.data.jsonl import iter_jsonl
from nemo_minitron.errors import CheckpointError, ConfigError, MinitronError
from nemo_minitron.tokenizer import load_tokenizer


@dataclass
class GenerateJobConfig:
    model: str = ""  # HF checkpoint directory (config.json, safetensors, tokenizer.json) or .nemo
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    prompt: str = ""  # one prompt; the completion alone goes to stdout
    prompts: str = ""  # or a JSONL file with a "prompt" field per line ...
    out: str = ""  # ... and the JSONL file the completions go to
    batch_size: int = 8
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234
    max_new_tokens: int = 64
    stop: List[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False


@dataclass
class PerplexityJobConfig:
    model: str = ""
    data: str = ""  # a text file (one document) or JSONL with a "text" field per line
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    window: int = 2048
    stride: int = 512
    batch_size: int = 4


@dataclass
class EvalHarnessJobConfig:
    model: str = ""
    tasks: List[str] = field(default_factory=list)  # lm-eval task names (--tasks a,b)
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    batch_size: int = 8
    num_fewshot: Optional[int] = None  # None: each task's default
    limit: Optional[float] = None  # lm-eval's --limit: examples (or fraction) per task
    max_gen_toks: int = 256
    out: str = ""  # optional JSON file for lm-eval's full results


# ---- checks before any expensive work ----------------------------------------------------------
def _model_config(source, tp: int, pp: int):
    """The model's architecture (``source``: a ``model.source.ModelSource``), checked against
    the parallel layout and the launched world, and its tokenizer's presence: no weight read."""
    import torch.distributed  # noqa: F401 - only to fail early if torch is broken

    from nemo_minitron.config import validate_parallel

    cfg = source.config
    from nemo_minitron.dist import launched_world_size

    world = launched_world_size()
    layout = validate_parallel(cfg, tp, pp, world_size=world)
    if layout.dp != 1:
        raise ConfigError(f"world size {world} != tp*pp = {tp * pp}: launch exactly tp*pp ranks "
                          "(data-parallel generation is not supported)")
    if not os.path.isfile(os.path.join(source.tokenizer_dir, "tokenizer.json")):
        raise ConfigError(f"model={source.path}: no tokenizer.json")
    return cfg


def read_prompts(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"prompts={path}: file not found")
    prompts = [row["prompt"] for _, row in iter_jsonl(path, ("prompt",))]
    if not prompts:
        raise ConfigError(f"prompts={path}: no prompts")
    return prompts


def read_documents(path: str) -> List[str]:
    """The documents of ``path`` by the one rule of every text-reading command
    (data/calibration.py ``iter_documents``: a text file is one document, JSONL one per line)."""
    from nemo_minitron.data.calibration import iter_documents

    docs = list(iter_documents(path))
    if not docs:
        raise ConfigError(f"data={path}: no documents (empty)")
    return docs


def sampling_params(job: GenerateJobConfig):
    from nemo_minitron.inference.sampling import SamplingParams

    return SamplingParams(greedy=job.greedy, temperature=job.temperature, top_k=job.top_k,
                          top_p=job.top_p, seed=job.seed, max_new_tokens=job.max_new_tokens,
                          stop=tuple(job.stop), ignore_eos=job.ignore_eos, logprobs=job.logprobs)


def _dtype(name: str) -> str:
    import torch

    if name == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    from nemo_minitron.config.megatron import torch_dtype

    return str(torch_dtype(name)).replace("torch.", "")


# ---- setup / cleanup -------------------------------------------------------------------------
def setup(model, tp: int, pp: int, dtype: str, seed: int = 1234):
    """Initialize Megatron at TP/PP and load this rank's part of ``model`` (a path or a
    ``model.source.ModelSource``): built without Megatron's random init (every weight is loaded
    right after; the load is strict)."""
    from nemo_minitron.dist import init_megatron
    from nemo_minitron.inference.runner import ModelRunner

    init_megatron(tp=tp, pp=pp, seed=seed)
    return ModelRunner.from_hf(model, dtype=_dtype(dtype))


def cleanup() -> None:
    from nemo_minitron.dist import destroy_megatron

    destroy_megatron()


# ---- the jobs --------------------------------------------------------------------------------
def _with_model_source(run):
    """``run(job, ..., source=...)`` with ``job.model`` opened as a ``model.source.ModelSource``
    (an HF directory or a .nemo, read natively; ``job.model`` stays the path the user gave)."""
    import functools

    @functools.wraps(run)
    def wrapper(job, *args, **kwargs):
        from nemo_minitron.model.source import ModelSource

        if not job.model:
            raise ConfigError("model=PATH (an HF checkpoint directory or a .nemo) is required")
        try:
            source = ModelSource(job.model)
        except CheckpointError as e:  # "model=PATH: ..." as the other job fields are named
            raise ConfigError(f"model={e}") from None
        with source:
            return run(job, *args, source=source, **kwargs)

    return wrapper


def check_output_file(path: str, label: str, inputs: dict) -> None:
    """A job's JSON(L) output: a file (replaced if it exists) in a writable place, never one of
    the job's ``inputs`` (label -> path) nor inside one."""
    from nemo_minitron.checkpoint.paths import check_disjoint, check_output

    check_disjoint({label: path}, inputs)
    check_output(path, label, overwrite=True, kind="file")


def _check_generate(job: GenerateJobConfig) -> None:
    """Everything about a generate job that needs neither the model nor its conversion."""
    if bool(job.prompt) == bool(job.prompts):
        raise ConfigError("give exactly one of prompt=TEXT or prompts=FILE.jsonl")
    if job.prompts and not job.out:
        raise ConfigError("prompts=FILE.jsonl needs out=FILE.jsonl")
    if isinstance(job.batch_size, bool) or job.batch_size < 1:
        raise ConfigError(f"batch_size={job.batch_size} must be >= 1")
    sampling_params(job)
    if job.out:
        check_output_file(job.out, "out", {"prompts": job.prompts, "model": job.model})
    if job.prompts:
        read_prompts(job.prompts)


def run_generate(job: GenerateJobConfig, stdout=None) -> Optional[list]:
    """Generate for ``job``; returns the completions (on every rank)."""
    _check_generate(job)  # before the model is opened
    return _run_generate(job, stdout)


@_with_model_source
def _run_generate(job: GenerateJobConfig, stdout=None, *, source) -> Optional[list]:
    import sys

    from nemo_minitron.dist import is_rank0
    from nemo_minitron.inference.generate import generate, validate_request

    stdout = stdout or sys.stdout
    params = sampling_params(job)
    cfg = _model_config(source, job.tp, job.pp)
    _dtype(job.dtype)
    texts = [job.prompt] if job.prompt else read_prompts(job.prompts)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    ids = [tokenizer.encode(t) for t in texts]  # adds <|begin_of_text|> as HF does
    validate_request(cfg, ids, params, tokenizer)  # lengths vs max positions, before any weight

    runner = setup(source, job.tp, job.pp, job.dtype, job.seed)
    try:
        completions = []
        for start in range(0, len(ids), job.batch_size):
            batch_params = params.replace(seed=params.seed + start)  # reproducible per batch
            completions += generate(runner, ids[start:start + job.batch_size], batch_params,
                                    tokenizer=tokenizer)
        if is_rank0():
            if job.prompt:
                stdout.write(completions[0].text + "\n")
                stdout.flush()
            else:
                _write_jsonl(job.out, texts, completions)
        return completions
    finally:
        cleanup()


def _write_jsonl(path: str, texts, completions) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for text, c in zip(texts, completions):
            row = {"prompt": text, "completion": c.text, "tokens": c.tokens,
                   "finish_reason": c.finish_reason}
            if c.logprobs is not None:
                row["logprobs"] = c.logprobs
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_perplexity(job: PerplexityJobConfig, stdout=None):
    """Sliding-window perplexity of ``job.data``; rank 0 prints one JSON line."""
    read_documents(job.data)  # readable UTF-8, before the model is opened
    return _run_perplexity(job, stdout)


@_with_model_source
def _run_perplexity(job: PerplexityJobConfig, stdout=None, *, source):
    import sys

    from nemo_minitron.dist import is_rank0
    from nemo_minitron.inference.score import perplexity, sliding_windows

    stdout = stdout or sys.stdout
    cfg = _model_config(source, job.tp, job.pp)
    sliding_windows(2, job.window, job.stride)  # validates window/stride
    if job.window > cfg.max_position_embeddings:
        raise ConfigError(f"window={job.window} exceeds the model's max_position_embeddings="
                          f"{cfg.max_position_embeddings}")
    _dtype(job.dtype)
    docs = read_documents(job.data)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    ids = [tokenizer.encode(d) for d in docs]
    short = [i for i, d in enumerate(ids) if len(d) < 2]
    if short:
        raise MinitronError(f"data={job.data}: document {short[0]} has fewer than 2 tokens")

    runner = setup(source, job.tp, job.pp, job.dtype)
    try:
        result = perplexity(runner, ids, job.window, job.stride, job.batch_size)
        if is_rank0():
            stdout.write(json.dumps({"ppl": result.ppl, "nll_per_token": result.mean_nll,
                                     "tokens": result.tokens, "documents": result.documents,
                                     "window": job.window, "stride": job.stride}) + "\n")
            stdout.flush()
        return result
    finally:
        cleanup()


def run_eval_harness(job: EvalHarnessJobConfig, stdout=None):
    """lm-evaluation-harness tasks on the Megatron model (all ranks run every request; rank 0
    prints lm-eval's table and writes ``out``)."""
    from nemo_minitron.inference.lm_eval_adapter import harness_lm_class

    harness_lm_class()  # first: a clear error when lm-eval is missing
    if not job.tasks:
        raise ConfigError("tasks=[...] (or --tasks a,b) is required")
    if job.out:  # before the model is opened
        check_output_file(job.out, "out", {"model": job.model})
    return _run_eval_harness(job, stdout)


@_with_model_source
def _run_eval_harness(job: EvalHarnessJobConfig, stdout=None, *, source):
    import sys

    from nemo_minitron.dist import is_rank0
    from nemo_minitron.inference.lm_eval_adapter import harness_lm_class

    stdout = stdout or sys.stdout
    lm_class = harness_lm_class()
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    cfg = _model_config(source, job.tp, job.pp)
    if job.max_gen_toks >= cfg.max_position_embeddings:
        raise ConfigError(f"max_gen_toks={job.max_gen_toks} must be below the model's "
                          f"max_position_embeddings={cfg.max_position_embeddings}")
    runner = setup(source, job.tp, job.pp, job.dtype)
    try:
        lm = lm_class(runner, load_tokenizer(source.tokenizer_dir), batch_size=job.batch_size,
                      max_gen_toks=job.max_gen_toks)
        results = simple_evaluate(model=lm, tasks=list(job.tasks), num_fewshot=job.num_fewshot,
                                  limit=job.limit)
        if is_rank0() and results is not None:
            stdout.write(make_table(results) + "\n")
            stdout.flush()
            if job.out:
                with open(job.out, "w", encoding="utf-8") as f:
                    json.dump(results.get("results", {}), f, indent=2, default=str)
        return results
    finally:
        cleanup()
