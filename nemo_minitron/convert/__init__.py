"""Checkpoint conversion between HF and NeMo/Megatron (mapping.py: the weight mapping table)."""
