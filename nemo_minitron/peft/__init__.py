"""Parameter-efficient fine-tuning.

    lora.py        LoRA adapters on Megatron's linear layers (TP-aware), checkpoint state, gathering
    adapter_io.py  the adapter directory, merging into the base (HF dir or .nemo), HF-PEFT export
"""
