"""The server through the official `openai` Python client (what load testers and eval tools
speak): models, batched prompts with n and logprobs, streaming with a stop string, concurrent
clients, and errors, all compared with transformers' greedy decoding of the same checkpoint."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import run_ranks
from tests.test_serve import _serve_with_client

pytestmark = pytest.mark.megatron

NEW = 8
NAME = "tiny-minitron"


def _client(prompts, stop):
    def client(base):
        import openai

        api = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        res = {"models": [m.id for m in api.models.list().data]}
        greedy = dict(model=NAME, max_tokens=NEW, temperature=0)
        res["batch"] = api.completions.create(prompt=prompts, n=2, logprobs=2,
                                              **greedy).model_dump()
        stream = api.completions.create(prompt=prompts, stop=[stop], stream=True,
                                        stream_options={"include_usage": True}, **greedy)
        res["chunks"] = [c.model_dump() for c in stream]
        with ThreadPoolExecutor(8) as pool:  # eight clients at once: batched into waves
            futures = [pool.submit(api.completions.create, prompt=prompts[i % 2], **greedy)
                       for i in range(8)]
            res["concurrent"] = [f.result(timeout=120).choices[0].text for f in futures]
        for kind, kwargs in (("bad", dict(prompt="x", logprobs=9, **greedy)),
                             ("unknown_model", dict(prompt="x", model="gpt-4", max_tokens=2))):
            try:
                api.completions.create(**kwargs)
                res[kind] = None
            except openai.APIStatusError as e:
                res[kind] = (type(e).__name__, e.status_code, e.body["message"])
        return res
    return client


def _rank(rank, hf_dir, prompts, stop):
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.tokenizer import load_tokenizer
    from tests.inference_utils import one_thread_per_rank

    one_thread_per_rank()
    runner = ModelRunner.from_hf(hf_dir, dtype="float32")
    tok = load_tokenizer(hf_dir)
    return _serve_with_client(runner, tok, _client(prompts, stop), model_name=NAME)


def test_openai_client_batches_n_logprobs_stream_and_errors_match_transformers(tiny_fp32_hf_dir):
    pytest.importorskip("openai")
    transformers = pytest.importorskip("transformers")
    import torch

    from pydoc_data.topics import topics

    tok = transformers.AutoTokenizer.from_pretrained(tiny_fp32_hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_fp32_hf_dir,
                                                              dtype=torch.float32).eval()
    prompts = [topics["if"][:60], topics["while"][:120]]
    hf = []  # (text, token strings, log-probabilities) of transformers' greedy completion
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        new = out.sequences[0, ids["input_ids"].shape[1]:].tolist()
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
        hf.append((tok.decode(new, skip_special_tokens=True), [tok.decode([t]) for t in new],
                   lps))
    # a stop string across a token boundary of prompt 0's completion: the stream must not send
    # its first part before it knows the rest
    text = hf[0][0]
    bounds = [len("".join(hf[0][1][: k + 1])) for k in range(NEW - 1)]
    b = next(b for b in bounds if 2 <= b < len(text) and text.find(text[b - 2: b + 1]) == b - 2)
    stop = text[b - 2: b + 1]
    res = run_ranks(_rank, args=(tiny_fp32_hf_dir, prompts, stop), timeout=240)[0]

    assert res["models"] == [NAME]
    body = res["batch"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == NAME and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for c in body["choices"]:  # choice i * n + j is prompt i's j-th sample
        text, token_strs, lps = hf[c["index"] // 2]
        assert c["text"] == text and c["finish_reason"] == "length"
        assert c["logprobs"]["tokens"] == token_strs
        assert max(abs(a - b) for a, b in zip(c["logprobs"]["token_logprobs"], lps)) < 1e-4
        for t, alternatives in zip(token_strs, c["logprobs"]["top_logprobs"]):
            assert len(alternatives) == 2 and max(alternatives, key=alternatives.get) == t
    n_prompt = sum(len(tok(p)["input_ids"]) for p in prompts)
    usage = {k: v for k, v in body["usage"].items() if v is not None}  # the client adds Nones
    assert usage == {"prompt_tokens": n_prompt, "completion_tokens": 4 * NEW,
                             "total_tokens": n_prompt + 4 * NEW}

    chunks = res["chunks"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == n_prompt
    streamed, reasons = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        (c,) = chunk["choices"]
        assert reasons[c["index"]] is None  # nothing after a choice's finish
        streamed[c["index"]] += c["text"]
        reasons[c["index"]] = c["finish_reason"]
    cut = [t[: t.index(stop)] if stop in t else t for t, _, _ in hf]
    assert streamed == cut and reasons[0] == "stop"
    assert res["concurrent"] == [hf[i % 2][0] for i in range(8)]
    assert res["bad"] == ("BadRequestError", 400,
                          "logprobs=9 must be an integer in [0, 5] (the alternatives per token) "
                          "or null")
    assert res["unknown_model"][:2] == ("NotFoundError", 404)
