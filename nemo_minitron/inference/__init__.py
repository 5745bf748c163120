"""Inference on the Megatron-Core model: KV-cache generation, scoring and perplexity under TP/PP.

    runner.py    ModelRunner: one forward step across pipeline stages, TP logit handling
    sampling.py  SamplingParams, greedy / temperature / top-k / top-p
    generate.py  generate(): batched incremental decoding with stop conditions
    score.py     per-token log-probabilities, sliding-window perplexity
    serve.py     the OpenAI-compatible HTTP server (openai_format.py: its response objects)
    lm_eval_adapter.py  the lm-evaluation-harness model "nemo_minitron"
"""
