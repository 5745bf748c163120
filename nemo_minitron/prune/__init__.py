"""Minitron pruning (width: hidden, ffn, heads/query groups; depth: layers) of a Llama-3.1 teacher.

    targets.py     the student's shape: a preset or key=value targets, validated before any work
    importance.py  the activation-importance pass over calibration data with Megatron forward hooks,
                   reduced over TP, PP and DP ranks; the scores file
    depth.py       layer importance: 1 - cosine(in, out) and LM loss with a contiguous block dropped
    prune.py       rankings (top-k indices) and slicing of full HF-named tensors; the student writer
"""
