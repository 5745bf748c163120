"""Inference on the Megatron-Core model: KV-cache generation, scoring and perplexity under TP/PP.

    runner.py    ModelRunner: one forward step across pipeline stages, TP logit handling
    sampling.py  SamplingParams, greedy / temperature / top-k / top-p
    generate.py  generate(): batched incremental decoding with stop conditions
    score.py     per-token log-probabilities, sliding-window perplexity
"""
