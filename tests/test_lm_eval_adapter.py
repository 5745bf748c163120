"""The lm-evaluation-harness adapter (MinitronLM) on the tiny HF checkpoint, without lm_eval:
requests are plain objects with lm-eval's ``.args`` tuples, and every expected value comes from
transformers (LlamaForCausalLM log-softmax sums, argmax checks, greedy generate)."""
import importlib.util

import pytest
import torch

from tests.helpers import run_ranks

pytestmark = pytest.mark.megatron


class Req:  # lm-eval's Instance, as far as an LM sees it
    def __init__(self, *args):
        self.args = args


def _texts():
    from pydoc_data.topics import topics

    # "...The "if" statement is": ends inside running text, so a greedy continuation's text
    # re-encodes to the same tokens
    return topics["if"][:60], topics["with"][:300]


@pytest.fixture(scope="module")
def hf(tiny_fp32_hf_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_fp32_hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_fp32_hf_dir,
                                                              dtype=torch.float32).eval()
    return tok, model


def _hf_logp(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [s, V]


def _greedy_continuation(tok, model, context, new=8):
    """The longest prefix of transformers' greedy tokens whose text re-encodes (after the
    context) to exactly those tokens: a continuation whose is_greedy must be True."""
    ids = tok(context)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    for k in range(len(out), 0, -1):
        piece = tok.decode(out[:k])
        if tok(context + piece)["input_ids"] == ids + out[:k]:
            return piece
    raise AssertionError("no greedy continuation survives re-tokenization")


def _hf_greedy(tok, model, context, new):
    ids = tok(context, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _adapter(rank, hf_dir, ll, rolling, gen):
    from nemo_minitron.inference.lm_eval_adapter import MinitronLM
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.tokenizer import load_tokenizer
    from tests.inference_utils import one_thread_per_rank

    one_thread_per_rank()
    lm = MinitronLM(ModelRunner.from_hf(hf_dir, dtype="float32"), load_tokenizer(hf_dir),
                    batch_size=2)
    return (lm.loglikelihood([Req(*a) for a in ll]),
            lm.loglikelihood_rolling([Req(t) for t in rolling]),
            lm.generate_until([Req(*a) for a in gen]),
            [lm.encode_pair(*a) for a in ll])


@pytest.mark.hf
def test_requests_match_transformers(tiny_fp32_hf_dir, hf):
    """TP=1 (the TP/PP code paths of scoring, is-greedy flags and generation are checked against
    TP=1 in test_inference_engine.py; a TP=2 run here costs ~40 s on 2 CPU cores)."""
    tok, model = hf
    text, long_text = _texts()
    # a continuation the model itself would produce greedily (is_greedy must be True), and one
    # it would not; a context with a trailing space; an empty context (scored after BOS alone)
    free = _hf_greedy(tok, model, text, 8)
    ll = [(text, _greedy_continuation(tok, model, text)), (text, " lorem ipsum"),
          ("The answer is: ", "yes"), ("", "Hello world")]
    rolling = [long_text, "x"]
    until = free[2:5]  # a stop string that really occurs in the greedy text
    gen = [(text, {"until": [until], "max_gen_toks": 12}),
           (long_text, {"until": ["\n\n"], "max_gen_toks": 8}),
           (text, {"max_gen_toks": 5, "do_sample": False})]
    loglik, rolled, generated, pairs = run_ranks(
        _adapter, args=(tiny_fp32_hf_dir, ll, rolling, gen))[0]

    # tokenization as lm-eval's HFLM does it: BOS + context, continuation from the joint encoding
    assert pairs[2][0] == tok("The answer is:")["input_ids"]  # trailing space moved across
    assert pairs[3][0] == [tok.bos_token_id]
    for (context, continuation), (ctx_ids, cont_ids) in zip(ll, pairs):
        assert ctx_ids[0] == tok.bos_token_id and tok.bos_token_id not in cont_ids
        assert tok.decode(ctx_ids + cont_ids, skip_special_tokens=True) == context + continuation

    greedy_flags = []
    for (logp_sum, is_greedy), (ctx_ids, cont_ids) in zip(loglik, pairs):
        ids = ctx_ids + cont_ids
        logp = _hf_logp(model, ids)
        rows = logp[len(ctx_ids) - 1: len(ids) - 1]  # predictions of the continuation tokens
        target = torch.tensor(cont_ids)
        assert logp_sum == pytest.approx(rows.gather(-1, target[:, None]).sum().item(), rel=1e-4)
        assert is_greedy == bool((rows.argmax(-1) == target).all())
        greedy_flags.append(is_greedy)
    assert greedy_flags[0] and not greedy_flags[1]  # both outcomes really exercised

    for text_in, got in zip(rolling, rolled):
        ids = tok(text_in)["input_ids"]
        logp = _hf_logp(model, ids)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        assert got == pytest.approx(logp, rel=1e-4)

    for (context, kwargs), got in zip(gen, generated):
        ref = _hf_greedy(tok, model, context, kwargs["max_gen_toks"])
        for stop in kwargs.get("until", []):
            ref = ref.split(stop)[0]
        assert got == ref
    assert until not in generated[0] and len(generated[0]) < len(free)  # the stop string cut it


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval installed")
def test_without_lm_eval_the_harness_class_and_command_say_how_to_install(capsys, tiny_hf_dir):
    from nemo_minitron.cli import main
    from nemo_minitron.errors import MinitronError
    from nemo_minitron.inference.lm_eval_adapter import harness_lm_class

    with pytest.raises(MinitronError, match="pip install lm-eval"):
        harness_lm_class()
    code = main(["eval-harness", "--model", tiny_hf_dir, "--tasks", "hellaswag"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "lm-eval is not installed: pip install lm-eval" in err


def _harness(rank, hf_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    from nemo_minitron.inference.lm_eval_adapter import MinitronLM, harness_lm_class
    from nemo_minitron.tokenizer import load_tokenizer

    cls = harness_lm_class()
    assert harness_lm_class() is cls and get_model("nemo_minitron") is cls and issubclass(cls, LM)
    lm = cls.create_from_arg_string(f"pretrained={hf_dir},dtype=float32", {"batch_size": 4})
    plain = MinitronLM(lm.runner, load_tokenizer(hf_dir), batch_size=4)
    ll = [Instance("loglikelihood", {}, ("The if statement is", " used"), 0)]
    gen = [Instance("generate_until", {}, ("The if", {"until": ["\n"], "max_gen_toks": 4}), 0)]
    got = (lm.loglikelihood(ll), lm.generate_until(gen))
    try:
        cls.create_from_arg_string(f"pretrained={hf_dir},bogus=1")
        bad = None
    except Exception as e:  # noqa: BLE001 - the message is checked
        bad = str(e)
    return got, (plain.loglikelihood(ll), plain.generate_until(gen)), bad


@pytest.mark.hf
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval not installed")
def test_with_lm_eval_the_registered_class_takes_instances(tiny_fp32_hf_dir):
    pytest.importorskip("transformers")
    got, plain, bad = run_ranks(_harness, args=(tiny_fp32_hf_dir,))[0]
    assert got == plain and len(got[0]) == 1 and isinstance(got[1][0], str)
    assert "unknown model_args ['bogus']" in bad
