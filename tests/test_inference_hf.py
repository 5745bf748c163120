"""Generation and perplexity on the Megatron model loaded from an HF checkpoint, against
transformers on the same weights (fp32), with the real Llama-3 tokenizer and real text
(CPython's pydoc_data.topics)."""
import math

import pytest
import torch

from tests.helpers import run_ranks

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.megatron, pytest.mark.hf]

NEW = 16


def _texts():
    from pydoc_data.topics import topics

    return [topics["assert"][:40], topics["if"][:150], topics["with"][:400]]  # ~10..100 tokens


def _document():
    from pydoc_data.topics import topics

    return topics["assignment"][:1000]  # ~200 tokens (tiny max positions 256): several windows


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_dir):
    from nemo_minitron.tokenizer import load_tokenizer

    return load_tokenizer(tiny_hf_dir)


def _ours(rank, hf_dir, texts, document):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.inference.sampling import SamplingParams
    from nemo_minitron.inference.score import perplexity
    from nemo_minitron.tokenizer import load_tokenizer
    from tests.inference_utils import one_thread_per_rank

    one_thread_per_rank()
    runner = ModelRunner.from_hf(hf_dir, dtype="float32")
    tok = load_tokenizer(hf_dir)
    prompts = [tok.encode(t) for t in texts]
    out = generate(runner, prompts, SamplingParams(greedy=True, max_new_tokens=NEW, logprobs=True),
                   tokenizer=tok)
    ids = tok.encode(document)
    full = perplexity(runner, [ids], window=len(ids), stride=len(ids))
    sliding = perplexity(runner, [ids], window=64, stride=24)
    return ([(c.prompt_ids, c.tokens, c.text, c.finish_reason) for c in out],
            full.ppl, (sliding.nll, sliding.tokens))


@pytest.mark.parametrize("tp, pp", [(1, 1), (1, 2)])
def test_greedy_and_perplexity_match_transformers(tiny_hf_dir, hf_model, tokenizer, tp, pp):
    texts, document = _texts(), _document()
    completions, ppl_full, (nll, count) = run_ranks(_ours, world_size=tp * pp, tp=tp, pp=pp,
                                                    args=(tiny_hf_dir, texts, document))[0]
    eos = hf_model.config.eos_token_id

    # transformers: the same prompts as one left-padded batch (its own positions and mask)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf_model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=eos)
    width = enc["input_ids"].shape[1]
    lengths = []
    for (prompt_ids, tokens, text, reason), row, text_in in zip(completions, ref, texts):
        assert prompt_ids[0] == tokenizer.bos_token_id == 128000  # BOS added as HF adds it
        assert prompt_ids == tokenizer(text_in)["input_ids"]
        ref_new = row[width:].tolist()
        if eos in ref_new:
            ref_new = ref_new[: ref_new.index(eos) + 1]
        assert tokens == ref_new
        assert text == tokenizer.decode(ref_new, skip_special_tokens=True)
        assert reason == ("eos" if tokens[-1] == eos else "length")
        lengths.append(len(prompt_ids))
    assert len(set(lengths)) == 3  # really different lengths

    ids = torch.tensor([tokenizer(document)["input_ids"]])
    with torch.no_grad():  # one window: exp of transformers' own mean LM loss
        ref_ppl = math.exp(hf_model(ids, labels=ids).loss.item())
    assert ppl_full == pytest.approx(ref_ppl, rel=1e-4)

    # sliding window 64 / stride 24, as transformers' perplexity guide slides it: each token
    # scored once, from the first window that ends past the previous window's end
    ref_nll, ref_count, prev_end, n = 0.0, 0, 1, ids.shape[1]
    for begin in range(0, n, 24):
        end = min(begin + 64, n)
        with torch.no_grad():
            logp = hf_model(ids[:, begin:end]).logits[0].float().log_softmax(-1)
        for t in range(max(prev_end, begin + 1), end):
            ref_nll -= logp[t - 1 - begin, ids[0, t]].item()
            ref_count += 1
        prev_end = end
        if end == n:
            break
    assert count == ref_count == n - 1
    assert nll == pytest.approx(ref_nll, rel=1e-4)


def _stop(rank, hf_dir, text, stop):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.inference.sampling import SamplingParams
    from nemo_minitron.tokenizer import load_tokenizer

    runner = ModelRunner.from_hf(hf_dir, dtype="float32")
    tok = load_tokenizer(hf_dir)
    params = SamplingParams(greedy=True, max_new_tokens=NEW)
    free = generate(runner, [tok.encode(text)], params, tokenizer=tok)[0]
    stop = stop or free.text[len(free.text) // 2: len(free.text) // 2 + 3]  # a real substring
    cut = generate(runner, [tok.encode(text)], params.replace(stop=[stop]), tokenizer=tok)[0]
    return free.text, free.tokens, stop, cut.text, cut.tokens, cut.finish_reason


def test_stop_string_ends_generation_and_is_cut_from_the_text(tiny_hf_dir):
    free_text, free_tokens, stop, text, tokens, reason = run_ranks(
        _stop, args=(tiny_hf_dir, _texts()[1], None))[0]
    assert stop in free_text and reason == "stop"
    assert text == free_text[: free_text.index(stop)]
    assert tokens == free_tokens[: len(tokens)] and len(tokens) < len(free_tokens)
