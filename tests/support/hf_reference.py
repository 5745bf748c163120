"""The independent reference for the real-NeMo tier: transformers' LlamaForCausalLM on an HF
checkpoint, run by the *current* stack's interpreter (transformers >= 4.45).

The NeMo 24.05 stack pins transformers 4.40.2, which derives head_dim from hidden/heads and has no
llama3 RoPE: it cannot be the oracle for this family. tests/test_nemo_real.py runs this file with
the current stack's Python (``.venv/bin/python``, built by ``make test`` first; override with
NEMO_MINITRON_REFERENCE_PYTHON) and reads the result with ``torch.load(weights_only=True)``.

    python tests/support/hf_reference.py HF_DIR REQUEST.json OUT.pt

REQUEST: ``{"input_ids": [[...], ...], "new_tokens": N}``. OUT: ``logits`` [b, s, vocab] fp32 for
the ids, ``greedy`` [b, s + N] (transformers' ``generate``, greedy, no eos stop), ``inv_freq``
[head_dim/2] (the llama3-scaled RoPE frequencies transformers computes), ``version``.
"""
import json
import sys

import torch


def main(hf_dir: str, request: str, out: str) -> None:
    import transformers

    with open(request) as f:
        req = json.load(f)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    ids = torch.tensor(req["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits.float()
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=req["new_tokens"], min_new_tokens=req["new_tokens"],
                                eos_token_id=None, pad_token_id=0)
    rotary = model.model.rotary_emb
    torch.save({"logits": logits, "greedy": greedy, "inv_freq": rotary.inv_freq.float().clone(),
                "version": transformers.__version__}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
