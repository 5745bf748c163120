"""Training: the one Megatron-Core loop (loop.py) and what it needs.

    config.py      recipe configs (trainer/model/data/optim) and the precedence rule
    data.py        NeMo SFT JSONL -> tokenized samples -> (packed) batches, deterministic order
    model.py       the trainable model for this rank
    optim.py       Megatron DDP, optimizer (Megatron's or the plain-torch fallback), LR schedule
    loop.py        Trainer: forward_step / loss_fn hooks, grad accumulation, validation, logging
    distill.py     logit distillation as loop hooks: frozen teacher, vocab-parallel KL, text data
    checkpoint.py  atomic distributed checkpoints and exact resume
    export.py      the final HF checkpoint (TP/PP gathered on rank 0)
    logs.py        console / CSV / optional TensorBoard
"""
