"""The Megatron-Core model for the family: building it and its Llama-3.1 RoPE."""
