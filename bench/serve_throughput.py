"""Throughput of `nemo-minitron serve` on the tiny model (CPU, loopback only): the server at git
HEAD ("before") against the working tree ("after"), both running at once, each level of
concurrency measured on one then the other, so both see the same machine load.

    .venv/bin/python bench/serve_throughput.py [--clients 1,8,32] [--max-tokens 32] [--rounds 3]
        [--unbatched --tag _unbatched]   # also the working tree with max_batch=1

In each of ``--rounds`` rounds, each level sends max(16, 2 * clients) greedy requests (text
prompts, max_tokens 32) from ``clients`` threads (every thread its share, one after another; 300 s
bound per request) after one warm-up request; the table sums the rounds. req/s = answered requests
/ wall time; tok/s = generated tokens / wall time. The HEAD tree is `git archive HEAD` unpacked
into a temporary folder (no git state is changed). Output: a table on stdout and in
bench/results/serve_throughput_<date>.txt.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):", "The three laws of thermodynamics are"]


def start_server(tree: str, model: str, *overrides: str) -> tuple:
    """(process, base url) of `serve` run from ``tree`` on a free loopback port."""
    env = dict(os.environ, PYTHONPATH=tree, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "nemo_minitron.cli", "serve", "--model", model,
                             "--port", "0", "dtype=float32", *overrides], cwd=tree, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "serving on http://127.0.0.1:PORT ..." once the model is up
    if not line.startswith("serving on http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"server in {tree} did not start: {line!r}")
    return proc, line.split()[2]


def complete(base: str, prompt: str, max_tokens: int) -> int:
    """Generated tokens of one greedy request (either response format)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return out["usage"]["completion_tokens"] if "usage" in out else len(out["tokens"])


def measure(base: str, clients: int, max_tokens: int) -> tuple:
    """(answered requests, seconds, tokens, failed requests) of ``clients`` threads, each
    sending its share of the requests."""
    total = max(16, 2 * clients)
    shares = [total // clients + (i < total % clients) for i in range(clients)]
    tokens, errors, lock = [0], [], threading.Lock()

    def client(i: int) -> None:
        for k in range(shares[i]):
            try:
                n = complete(base, PROMPTS[(i + k) % len(PROMPTS)], max_tokens)
            except OSError as e:  # a refused or reset connection: counted, not retried
                with lock:
                    errors.append(type(e).__name__)
                continue
            with lock:
                tokens[0] += n

    complete(base, PROMPTS[0], max_tokens)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client, i) for i in range(clients)]:
            f.result(timeout=300)
    return total - len(errors), time.perf_counter() - start, tokens[0], len(errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--unbatched", action="store_true", help="also serve the working tree with "
                    "max_batch=1 (one request per decode loop, as before)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--rounds", type=int, default=3, help="before/after alternations per level; "
                    "the table sums them (the CPUs are shared: one round is noisy)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    sys.path.insert(0, ROOT)
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "before")
        os.makedirs(before)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        model = write_tiny_hf_checkpoint(os.path.join(tmp, "tiny"), preset="tiny_llama31",
                                         seed=0, dtype="float32")
        servers = {"before": start_server(before, model)}
        if args.unbatched:  # the working tree with batching off: what batching alone buys
            servers["after, max_batch=1"] = start_server(ROOT, model, "max_batch=1")
        servers["after"] = start_server(ROOT, model)
        sums = {}  # (clients, server) -> [answered, failed, seconds, tokens] over the rounds
        try:
            for r in range(args.rounds):
                for clients in levels:
                    for name, (_, base) in servers.items():
                        n, secs, toks, failed = measure(base, clients, args.max_tokens)
                        acc = sums.setdefault((clients, name), [0, 0, 0.0, 0])
                        for i, v in enumerate((n, failed, secs, toks)):
                            acc[i] += v
                        print(f"  round {r}: {clients:>3} clients {name:<18} {n:>3} req in "
                              f"{secs:6.2f} s, {failed} failed", file=sys.stderr, flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    lines = [f"# bench/serve_throughput.py  {stamp} UTC; before = git HEAD {head}, after = "
             f"working tree; tiny_llama31 fp32 on "
             f"CPU ({os.cpu_count()} cores, shared), greedy, max_tokens={args.max_tokens}, "
             f"{args.rounds} rounds summed (each round: every level, before then after)",
             "(failed: connections refused or reset, not retried; req/s and tok/s count answered "
             "requests only)",
             f"{'clients':>7} {'server':<18} {'answered':>8} {'failed':>6} {'seconds':>8} "
             f"{'req/s':>7} {'tok/s':>8} {'vs before req/s':>16}"]
    rows = [(c, name, n, failed, secs, n / secs, toks / secs)
            for (c, name), (n, failed, secs, toks) in sums.items()]
    for clients, name, n, failed, secs, rps, tps in rows:
        ratio = ""
        if name != "before":
            base_rps = next(r[5] for r in rows if r[0] == clients and r[1] == "before")
            ratio = f"{rps / base_rps:.2f}x" if base_rps else "-"
        lines.append(f"{clients:>7} {name:<18} {n:>8} {failed:>6} {secs:>8.2f} {rps:>7.2f} "
                     f"{tps:>8.1f} {ratio:>16}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = os.path.join(ROOT, "bench", "results",
                       f"serve_throughput_{datetime.date.today():%Y-%m-%d}{args.tag}.txt")
    with open(out, "w") as f:
        f.write(text)
    print(f"written: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
