"""An lm-evaluation-harness model on the Megatron runner: loglikelihood, rolling loglikelihood
and generate_until under TP/PP, for the model-card table (MMLU, HellaSwag, Winogrande, ARC-C,
GSM8K).

    torchrun --nproc-per-node 4 -m nemo_minitron.cli eval-harness --model HF_DIR \\
        --tasks mmlu,hellaswag,winogrande,arc_challenge,gsm8k tp=4 batch_size=8

    >>> lm = MinitronLM(runner, load_tokenizer(hf_dir))           # no lm_eval needed
    >>> lm.loglikelihood([Req(("The capital of France is", " Paris"))])  # [(sum logp, is_greedy)]
    >>> harness_lm_class()                    # the lm_eval.api.model.LM subclass (needs lm_eval)

lm_eval is never imported by this module at import time: :class:`MinitronLM` implements the three
methods on anything with an ``.args`` tuple (lm-eval's ``Instance`` shape), and
:func:`harness_lm_class` mixes it into ``lm_eval.api.model.LM`` only when asked.

Tokenization follows lm-eval's HFLM for a Llama tokenizer: the context is encoded with BOS; the
continuation's tokens are those of ``encode(context + continuation)`` after the context's tokens
(so a word split across the boundary is tokenized as in running text), with trailing spaces of the
context moved to the continuation first. Too-long inputs are left-truncated to ``max_length``
(default: the model's max_position_embeddings), as HFLM does.

Tensor/pipeline parallelism: every rank of the model-parallel group must make the same calls in
the same order (the forwards are collective). The harness's own data parallelism is therefore
turned off (``rank`` 0, ``world_size`` 1 on every rank): all ranks see all requests, and only
rank 0 should report. Data parallel evaluation is not supported.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from nemo_minitron.errors import MinitronError
from nemo_minitron.inference.generate import generate
from nemo_minitron.inference.runner import ModelRunner
from nemo_minitron.inference.sampling import SamplingParams
from nemo_minitron.inference.score import perplexity, token_logprobs

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default


def _args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class MinitronLM:
    """lm-eval's LM methods on a :class:`ModelRunner` and an HF tokenizer (see the module doc)."""

    def __init__(self, runner: ModelRunner, tokenizer, batch_size: int = 8,
                 max_length: Optional[int] = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()  # lm_eval's LM.__init__ when mixed in by harness_lm_class
        self.runner = runner
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or runner.cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        if self.max_length > runner.cfg.max_position_embeddings:
            raise MinitronError(f"max_length={self.max_length} exceeds the model's "
                                f"max_position_embeddings={runner.cfg.max_position_embeddings}")

    # ---- what lm-eval's evaluator asks of a model ---------------------------------------------
    @property
    def rank(self) -> int:  # see the module doc: TP/PP ranks all run every request
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, text: str) -> List[int]:
        """Ids without BOS (lm-eval's tok_encode for a causal LM)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """(context ids with BOS, continuation ids), split as HFLM splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # "Answer: " + "Paris" scores " Paris", the way the text runs
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)  # BOS + ...
        context_ids = self.tokenizer.encode(context)  # BOS + ... ([BOS] for an empty context)
        return context_ids, whole[len(context_ids):]

    # ---- loglikelihood ------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        """(sum of log p(continuation tokens | context), whether greedy decoding would produce
        exactly the continuation) per request of args (context, continuation)."""
        sequences, counts = [], []
        for i, request in enumerate(requests):
            context, continuation = _args(request)[:2]
            context_ids, cont_ids = self.encode_pair(context, continuation)
            if not cont_ids:
                raise MinitronError(f"request {i}: the continuation {continuation!r} has no tokens")
            # left-truncate like HFLM; our forward also runs the last token (its prediction
            # unused), so the window is max_length tokens where HFLM's is max_length + 1
            ids = (context_ids + cont_ids)[-self.max_length:]
            if len(cont_ids) >= len(ids):
                raise MinitronError(f"request {i}: the continuation alone ({len(cont_ids)} tokens)"
                                    f" does not fit max_length={self.max_length}")
            sequences.append(ids)
            counts.append(len(cont_ids))
        results = []
        for (logp, is_max), n in zip(token_logprobs(self.runner, sequences, self.batch_size,
                                                    greedy=True), counts):
            results.append((float(logp[-n:].double().sum()), bool(is_max[-n:].all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Sum of log p of every token of each string (args (text,)), BOS as the first context,
        in disjoint windows of max_length (lm-eval's rolling windows; one token of overlap)."""
        out = []
        for request in requests:
            ids = self.tokenizer.encode(_args(request)[0])  # BOS + text
            if len(ids) < 2:
                out.append(0.0)  # an empty string has no tokens to score
                continue
            res = perplexity(self.runner, [ids], window=self.max_length, stride=self.max_length,
                             batch_size=self.batch_size)
            out.append(-res.nll)
        return out

    # ---- generation ---------------------------------------------------------------------------
    def _sampling(self, gen_kwargs: Dict) -> Tuple[SamplingParams, int]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        top_k = int(kwargs.pop("top_k", 0) or 0)
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        seed = int(kwargs.pop("seed", 1234))
        kwargs.pop("max_length", None)  # HF generate kwargs we replace by max_gen_toks
        if kwargs:
            raise MinitronError(f"generate_until: unsupported generation kwargs {sorted(kwargs)}")
        greedy = not do_sample or temperature == 0
        return SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, max_new_tokens=max_gen, stop=tuple(until)), max_gen

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """The completion of each args (context, gen_kwargs) request, cut before the first of
        ``until`` (the end-of-text token also ends it); requests with equal kwargs are batched."""
        parsed = []
        for request in requests:
            context, gen_kwargs = _args(request)[:2]
            params, max_gen = self._sampling(gen_kwargs or {})
            keep = self.max_length - max_gen  # room for the generated tokens
            if keep < 1:
                raise MinitronError(f"max_gen_toks={max_gen} leaves no room for a context in "
                                    f"max_length={self.max_length}")
            ids = self.tokenizer.encode(context)
            if len(ids) > keep:
                ids = [ids[0]] + ids[-(keep - 1):] if keep > 1 else ids[-1:]  # BOS + recent text
            parsed.append((ids, params))
        results: List[Optional[str]] = [None] * len(parsed)
        groups: Dict[SamplingParams, List[int]] = {}
        for i, (_, params) in enumerate(parsed):
            groups.setdefault(params, []).append(i)
        for params, indices in groups.items():  # same order on every rank: dicts keep insertion
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                out = generate(self.runner, [parsed[i][0] for i in chunk], params,
                               tokenizer=self.tokenizer)
                for i, completion in zip(chunk, out):
                    results[i] = completion.text
        return results


_HARNESS_CLASS = None  # built and registered once: lm-eval refuses a second class of one name


def harness_lm_class():
    """``MinitronLM`` as an ``lm_eval.api.model.LM`` subclass, registered as "nemo_minitron"
    (``simple_evaluate(model="nemo_minitron", model_args="pretrained=HF_DIR,tp=2")``)."""
    global _HARNESS_CLASS
    if _HARNESS_CLASS is not None:
        return _HARNESS_CLASS
    try:
        # lm-eval (0.4.9+) imports its built-in models ("hf", "vllm", ...) only when a lookup
        # finds its registry empty: registering ours first would hide them all
        import lm_eval.models  # noqa: F401
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise MinitronError("lm-eval is not installed: pip install lm-eval") from None

    class HarnessLM(MinitronLM, LM):
        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config=None):
            from lm_eval.utils import simple_parse_args_string

            args = simple_parse_args_string(arg_string)
            # the harness's own extras: batch_size is ours; device / max_batch_size do not apply
            # (the device comes from the launch: one GPU per rank)
            extra = additional_config or {}
            if extra.get("batch_size") is not None:
                args.setdefault("batch_size", extra["batch_size"])
            return from_pretrained(cls, **args)

    register_model("nemo_minitron")(HarnessLM)
    _HARNESS_CLASS = HarnessLM
    return HarnessLM


def from_pretrained(cls, pretrained: str, tp: int = 1, pp: int = 1, dtype: str = "auto",
                    batch_size=8, max_length=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS, seed=1234,
                    **unknown):
    """Initialize Megatron at TP/PP (if not yet) and build ``cls`` on the checkpoint ``pretrained``
    (an HF directory or a .nemo)."""
    if unknown:
        raise MinitronError(f"unknown model_args {sorted(unknown)} for nemo_minitron; known: "
                            "pretrained, tp, pp, dtype, batch_size, max_length, max_gen_toks, seed")
    from megatron.core import parallel_state as ps

    from nemo_minitron.inference.job import _dtype
    from nemo_minitron.model.source import ModelSource
    from nemo_minitron.tokenizer import load_tokenizer

    if not ps.model_parallel_is_initialized():
        from nemo_minitron.dist import init_megatron

        init_megatron(tp=int(tp), pp=int(pp), seed=int(seed))
    with ModelSource(pretrained) as source:  # an HF directory or a .nemo, read natively
        runner = ModelRunner.from_hf(source, dtype=_dtype(dtype))
        tokenizer = load_tokenizer(source.tokenizer_dir)
    batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
    return cls(runner, tokenizer, batch_size=batch_size,
               max_length=max_length and int(max_length), max_gen_toks=int(max_gen_toks))
