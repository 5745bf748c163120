"""config.json of the three released models, as published (transformers_version kept as shipped).

Sources (Hugging Face model repos, main branch):
  https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
  https://huggingface.co/nvidia/Llama-3.1-Minitron-4B-Width-Base/blob/main/config.json
  https://huggingface.co/nvidia/Llama-3.1-Minitron-4B-Depth-Base/blob/main/config.json
The numbers agree with shared/FACTS.md section 1 and the model cards.
"""

_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}

_COMMON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": _LLAMA31_ROPE,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}

LLAMA31_8B = dict(_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  transformers_version="4.43.0.dev0")  # no head_dim key

MINITRON_4B_WIDTH = dict(_COMMON, head_dim=128, hidden_size=3072, intermediate_size=9216,
                         num_hidden_layers=32, transformers_version="4.45.0.dev0")

MINITRON_4B_DEPTH = dict(_COMMON, head_dim=128, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=16, transformers_version="4.45.0.dev0")

REAL = {"llama31_8b": LLAMA31_8B, "minitron_4b_width": MINITRON_4B_WIDTH,
        "minitron_4b_depth": MINITRON_4B_DEPTH}
