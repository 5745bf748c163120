"""Checkpoint I/O: HF safetensors directories (hf_io.py), tiny random checkpoints (tiny.py)."""
