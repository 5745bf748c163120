"""nemo_minitron: Llama-3.1-Minitron-4B (and its Llama-3.1-8B teacher) for NeMo / Megatron-Core."""

__version__ = "0.1.0"
