"""Peak memory and time of the chunked KD loss against the naive full-logits implementation.

    .venv/bin/python bench/kd_loss.py [--vocab 128256] [--tokens 1024 2048 4096 8192] [--naive-max 4096]

Each measurement runs in a fresh process: it allocates the student and teacher logits
[tokens, vocab] (fp32) first, then measures forward + backward. Reported: wall time and the peak
RSS *above* what the inputs already hold (the inputs and the student's gradient are the same for
both methods), and ratios ours / naive at the same size, measured in the same run. The naive loss
is F.kl_div(log_softmax(s), log_softmax(t)) on the full logits, as a straightforward
implementation writes it.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import time


def _measure(method, tokens, vocab, chunk, queue):
    import psutil
    import torch
    import torch.nn.functional as F

    from nemo_minitron.losses.kd import vocab_parallel_kl

    torch.manual_seed(0)
    s = torch.randn(tokens, vocab).requires_grad_(True)
    t = torch.randn(tokens, vocab)
    s.grad = torch.zeros_like(s)  # the gradient buffer exists for both methods
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if method == "naive":
        loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                        reduction="batchmean")
    else:  # as distillation uses it: the teacher logits exist only for this loss
        loss = vocab_parallel_kl(s, t, chunk_tokens=chunk, reuse_teacher_logits=method == "ours")
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    queue.put((elapsed, max(0, peak - base), loss.item()))


def run(method, tokens, vocab, chunk):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, tokens, vocab, chunk, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--naive-max", type=int, default=4096,
                        help="largest token count to run the naive loss at (memory)")
    parser.add_argument("--chunk", type=int, default=128)
    args = parser.parse_args()
    print(f"vocab {args.vocab}, fp32 logits, chunk {args.chunk} tokens")
    print("ours: gradient stored in the teacher logits; ours-alloc: in a new buffer")
    print(f"{'tokens':>7} {'method':>10} {'time s':>7} {'extra GB':>9} {'time x':>7} "
          f"{'mem x':>7} {'|dloss|':>8}")
    for tokens in args.tokens:
        naive = run("naive", tokens, args.vocab, args.chunk) if tokens <= args.naive_max else None
        if naive:
            print(f"{tokens:>7} {'naive':>10} {naive[0]:>7.2f} {naive[1] / 1e9:>9.2f}")
        for method in ("ours", "ours-alloc"):
            r = run(method, tokens, args.vocab, args.chunk)
            ratios = (f" {r[0] / naive[0]:>7.2f} {r[1] / naive[1]:>7.3f} "
                      f"{abs(r[2] - naive[2]):>8.1e}" if naive else "")
            print(f"{tokens:>7} {method:>10} {r[0]:>7.2f} {r[1] / 1e9:>9.2f}{ratios}")


if __name__ == "__main__":
    main()
