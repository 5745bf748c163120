"""Compatibility: Megatron-Core version differences (mcore.py) and the CPU shim (cpu.py)."""
