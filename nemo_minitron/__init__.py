"""nemo_minitron: Llama-3.1-Minitron-4B (and its Llama-3.1-8B teacher) for NeMo / Megatron-Core."""
import os as _os

# Conversion and verify run Megatron in a forked one-rank child (convert/dist_ckpt.py). A plain
# torch.cuda.is_available() initializes the CUDA driver in the parent, after which CUDA fails in
# any forked child; the NVML-based check answers the same question without that (torch reads this
# variable at each call).
_os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

__version__ = "0.1.0"
