"""`nemo-minitron serve`: a real HTTP server on a free 127.0.0.1 port inside a forked rank, a real
urllib client in a thread of that rank, answers compared with the generate engine (and with
transformers for text prompts). Every request has a timeout; the client stops the server when
done, so each run ends by itself."""
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import run_ranks
from tests.test_inference_engine import CFG, PROMPTS

pytestmark = pytest.mark.megatron

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 8


def _call(base, path, body=None, timeout=60):
    """(status, decoded JSON) of GET (body None) or POST (dict, or raw bytes) to base + path."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _serve_with_client(runner, tokenizer, client, **server_kwargs):
    """Serve on every rank; on rank 0 ``client(base_url)`` runs in a thread, then stops the
    server. Returns the client's result on rank 0, None elsewhere."""
    import torch.distributed as dist

    from nemo_minitron.inference.serve import CompletionServer

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    server = CompletionServer(runner, tokenizer, "127.0.0.1", 0, listen=rank0, **server_kwargs)
    out = {}
    if rank0:
        host, port = server.address
        assert host == "127.0.0.1"

        def run():
            try:
                out["result"] = client(f"http://{host}:{port}")
            except BaseException as e:  # noqa: BLE001 - reported by the test
                out["error"] = repr(e)
            finally:
                server.stop()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
    server.serve_forever()  # returns once the client thread called stop()
    if rank0:
        thread.join(timeout=30)
        assert "error" not in out, out.get("error")
        return out["result"]
    return None


BAD = [  # (body, expected status, a phrase of the error message)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"max_tokens": 4}, 400, "\"prompt\" is required"),
    ({"prompt": [1, 5], "bogus": 1}, 400, "unsupported field(s) ['bogus']"),
    ({"prompt": [1, 5], "echo": True}, 400, "unsupported field(s) ['echo']"),
    ({"prompt": [1, 5], "top_p": 2}, 400, "top_p=2 must be in (0, 1]"),
    ({"prompt": [1, 5], "temperature": -1}, 400, "temperature=-1"),
    ({"prompt": [1, 5], "max_tokens": 0}, 400, "max_tokens=0 must be a positive integer"),
    ({"prompt": [1, 5], "max_tokens": 10000}, 400, "exceeds the model's max_position_embeddings"),
    ({"prompt": [[1, 5], [1, 100000]]}, 400, "prompt 1 has token id(s) outside [0, 500)"),
    ({"prompt": [[1, 5], []]}, 400, "\"prompt\" is required"),
    ({"prompt": [1, 5], "logprobs": "yes"}, 400, "logprobs='yes'"),
    ({"prompt": [1, 5], "logprobs": True}, 400, "logprobs=True"),
    ({"prompt": [1, 5], "logprobs": 6}, 400, "logprobs=6 must be an integer in [0, 5]"),
    ({"prompt": [1, 5], "n": 0}, 400, "n=0 must be a positive integer"),
    ({"prompt": [[1, 5]] * 2, "n": 65}, 400, "over 128 completions"),
    ({"prompt": [1, 5], "stream_options": {"include_usage": True}}, 400, "only allowed with"),
    ({"prompt": [1, 5], "seed": 1 << 64}, 400, "must be an integer in [0, 2**64)"),
    ({"prompt": [1, 5], "stop": {"a": 1}}, 400, "must be a string or a list of strings"),
    ({"prompt": "text"}, 400, "no tokenizer"),
    ({"prompt": [1, 5], "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
]


def _random_client(base, repeat):
    ok = lambda p, **kw: _call(base, "/v1/completions",  # noqa: E731
                               dict(prompt=p, max_tokens=NEW, temperature=0, **kw))
    res = {"health": _call(base, "/health"), "models": _call(base, "/v1/models"),
           "first": ok(PROMPTS[0], logprobs=0)}
    sampled = dict(prompt=PROMPTS[1], max_tokens=NEW, temperature=0.8, top_k=50, seed=7)
    jobs = [("greedy", p) for p in PROMPTS] * repeat + [("sampled", None)] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:  # all in flight at once
        futures = [pool.submit(ok, p) if kind == "greedy"
                   else pool.submit(_call, base, "/v1/completions", sampled) for kind, p in jobs]
        res["concurrent"] = [f.result(timeout=120) for f in futures]
    res["bad"] = [_call(base, "/v1/completions", body) for body, _, _ in BAD]
    res["not_found"] = _call(base, "/nope")
    res["after"] = ok(PROMPTS[0], logprobs=0)
    return res


def _random_rank(rank, repeat):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.sampling import SamplingParams
    from tests.inference_utils import random_runner

    runner = random_runner(CFG)
    greedy = SamplingParams(greedy=True, max_new_tokens=NEW, logprobs=True)
    ref = [(c.tokens, c.logprobs, c.finish_reason) for c in
           (generate(runner, [p], greedy)[0] for p in PROMPTS)]
    sampled = generate(runner, [PROMPTS[1]], SamplingParams(
        temperature=0.8, top_k=50, seed=7, max_new_tokens=NEW))[0].tokens
    return ref, sampled, _serve_with_client(runner, None, lambda b: _random_client(b, repeat))


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_completions_equal_the_engine_bad_requests_are_4xx_and_serving_goes_on(tp, pp):
    """(1, 2): the sampling rank is the last stage (rank 1), not the rank that serves."""
    repeat = 2 if tp * pp == 1 else 1  # two forked ranks share the 2 CPU cores: fewer requests
    per_rank = run_ranks(_random_rank, world_size=tp * pp, tp=tp, pp=pp, args=(repeat,),
                         timeout=180)
    ref, sampled, res = per_rank[0]
    assert res["health"] == (200, {"status": "ok", "queued": 0})
    assert res["models"][0] == 200 and [m["id"] for m in res["models"][1]["data"]] == [
        "nemo-minitron"]
    for key in ("first", "after"):  # the same request before and after the bad ones
        status, body = res[key]
        assert status == 200 and body["object"] == "text_completion"
        (choice,) = body["choices"]
        want_reason = "length" if ref[0][2] == "length" else "stop"
        assert (choice["token_ids"], choice["finish_reason"]) == (ref[0][0], want_reason)
        got = choice["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(got, ref[0][1])) < 1e-5
        assert choice["text"] is None and choice["logprobs"]["top_logprobs"] is None
        assert body["usage"] == {"prompt_tokens": len(PROMPTS[0]),
                                 "completion_tokens": len(ref[0][0]),
                                 "total_tokens": len(PROMPTS[0]) + len(ref[0][0])}
    greedy_answers = res["concurrent"][: repeat * len(PROMPTS)]
    assert len(greedy_answers) == repeat * len(PROMPTS)
    for (status, body), p in zip(greedy_answers, PROMPTS * repeat):
        assert status == 200 and body["choices"][0]["token_ids"] == ref[PROMPTS.index(p)][0]
        assert body["choices"][0]["logprobs"] is None
    for status, body in res["concurrent"][repeat * len(PROMPTS):]:
        assert status == 200 and body["choices"][0]["token_ids"] == sampled  # same seed
    assert sampled != ref[1][0]  # really sampled, not greedy
    for (status, body), (_, want, phrase) in zip(res["bad"], BAD):
        assert status == want and phrase in body["error"]["message"], (status, body)
        assert body["error"]["type"] == "invalid_request_error"
    assert res["not_found"][0] == 404
    if tp * pp == 2:  # the other rank computed the same references and served no HTTP
        assert per_rank[1][:2] == per_rank[0][:2] and per_rank[1][2] is None


def _text_client(prompts, stop):
    def client(base):
        greedy = [_call(base, "/v1/completions", dict(prompt=p, max_tokens=NEW, temperature=0))
                  for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_call, base, "/v1/completions",
                                   dict(prompt=p, max_tokens=NEW, temperature=0))
                       for p in prompts]
            concurrent = [f.result(timeout=120) for f in futures]
        cut = _call(base, "/v1/completions", dict(prompt=prompts[0], max_tokens=NEW,
                                                  temperature=0, stop=stop))
        return greedy, concurrent, cut
    return client


def _text_rank(rank, hf_dir, prompts, stop):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.runner import ModelRunner
    from nemo_minitron.inference.sampling import SamplingParams
    from nemo_minitron.tokenizer import load_tokenizer
    from tests.inference_utils import one_thread_per_rank

    one_thread_per_rank()
    runner = ModelRunner.from_hf(hf_dir, dtype="float32")
    tok = load_tokenizer(hf_dir)
    engine = [generate(runner, [tok.encode(p)], SamplingParams(greedy=True, max_new_tokens=NEW),
                       tokenizer=tok)[0] for p in prompts]
    return ([(c.text, c.tokens) for c in engine],
            _serve_with_client(runner, tok, _text_client(prompts, stop)))


def test_text_prompts_match_the_engine_and_transformers(tiny_fp32_hf_dir):
    transformers = pytest.importorskip("transformers")
    import torch

    from pydoc_data.topics import topics

    tok = transformers.AutoTokenizer.from_pretrained(tiny_fp32_hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_fp32_hf_dir,
                                                              dtype=torch.float32).eval()
    prompts = [topics["if"][:60], topics["while"][:120]]
    hf = []
    for p in prompts:  # transformers' greedy completion: the independent reference
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        hf.append((tok.decode(new, skip_special_tokens=True), new))
    stop = hf[0][0][3:6]  # occurs in the greedy text of prompt 0
    engine, (greedy, concurrent, cut) = run_ranks(
        _text_rank, args=(tiny_fp32_hf_dir, prompts, stop), timeout=180)[0]
    assert engine == hf
    assert len(greedy + concurrent) == 2 * len(hf)
    for (status, body), (text, tokens) in zip(greedy + concurrent, hf + hf):
        choice = body["choices"][0]
        assert status == 200 and (choice["text"], choice["token_ids"]) == (text, tokens)
    status, body = cut
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == hf[0][0][: hf[0][0].index(stop)]


def test_serve_command_answers_and_stops_cleanly_on_sigterm(tiny_hf_dir):
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "nemo_minitron.cli", "serve", "--model",
                             tiny_hf_dir, "--port", "0", "dtype=float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # "serving on http://127.0.0.1:PORT ..." once ready
        assert line.startswith("serving on http://127.0.0.1:"), (line, proc.stderr.read())
        base = line.split()[2]
        assert _call(base, "/health")[0] == 200
        status, body = _call(base, "/v1/completions", {"prompt": "Hello", "max_tokens": 3,
                                                       "temperature": 0})
        assert status == 200 and len(body["choices"][0]["token_ids"]) == 3
        assert isinstance(body["choices"][0]["text"], str)
        assert body["model"] == os.path.basename(tiny_hf_dir)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _wave_rank(rank):
    """Four requests queued before the loop starts: they must be decoded as one wave, and each
    must get what it gets alone (greedy and seeded sampling, prompt lists, n, max_tokens)."""
    import torch.distributed as dist

    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.sampling import SamplingParams
    from nemo_minitron.inference.serve import CompletionRequest, CompletionServer
    from tests.inference_utils import random_runner

    runner = random_runner(CFG)
    greedy = SamplingParams(greedy=True, max_new_tokens=NEW, logprobs=True, top_logprobs=2)
    sampled = SamplingParams(temperature=0.8, top_k=50, seed=7, max_new_tokens=5)
    requests = [(CompletionRequest([PROMPTS[0]]), greedy),
                (CompletionRequest([PROMPTS[2], PROMPTS[1]], n=2), sampled),
                (CompletionRequest([PROMPTS[1]]), greedy.replace(max_new_tokens=3)),
                (CompletionRequest([PROMPTS[2]]), sampled.replace(seed=8))]
    alone = [generate(runner, [p for p in r.prompts for _ in range(r.n)], params)
             for r, params in requests]
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    server = CompletionServer(runner, None, "127.0.0.1", 0, listen=rank0)
    if not rank0:
        server.serve_forever()
        return None
    works = [server.submit(r, p) for r, p in requests]

    def stop_when_done():
        for w in works:
            w.done.wait(120)
        server.stop()

    threading.Thread(target=stop_when_done, daemon=True).start()
    server.serve_forever()
    as_lists = lambda cs: [(c.tokens, c.logprobs, c.top_logprobs, c.finish_reason)  # noqa: E731
                           for c in cs]
    return ([as_lists(a) for a in alone], [as_lists(w.result) for w in works],
            list(server.waves))


@pytest.mark.parametrize("tp", [1, 2])
def test_waiting_requests_are_decoded_in_one_wave_and_each_gets_what_it_gets_alone(tp):
    alone, batched, waves = run_ranks(_wave_rank, world_size=tp, tp=tp, timeout=180)[0]
    assert waves == [4]  # one decode loop for all four requests (seven rows)
    for want, got in zip(alone, batched):
        assert len(want) == len(got)
        for (tokens, lps, tops, reason), (b_tokens, b_lps, b_tops, b_reason) in zip(want, got):
            assert (b_tokens, b_reason) == (tokens, reason)
            if lps is not None:
                assert max(abs(x - y) for x, y in zip(lps, b_lps)) < 1e-5
                assert [[i for i, _ in t] for t in tops] == [[i for i, _ in t] for t in b_tops]
    assert [len(t) for t, *_ in batched[2]] == [3]  # its own max_tokens inside the wave
    sampled_choices = [t for t, *_ in batched[1]]  # prompt 2 twice (n=2), then prompt 1 twice
    assert sampled_choices[0] != sampled_choices[1]  # n draws distinct samples
    assert batched[3][0][0] != batched[1][0][0]  # another seed, other tokens
