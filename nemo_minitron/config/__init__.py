"""The architecture config of the Llama-3.1 / Minitron family and its translations.

    arch.py      ModelConfig, RopeScaling: the one dataclass; parameter counts, padded vocab
    hf.py        HF config.json <-> ModelConfig (one table of field pairs), tensor-shape checks
    nemo.py      NeMo model_config.yaml <-> ModelConfig
    megatron.py  ModelConfig -> Megatron-Core TransformerConfig and GPTModel arguments
    parallel.py  TP/PP layout validation
    presets.py   the real models and the tiny test family, as data
"""
from nemo_minitron.config.arch import ModelConfig, RopeScaling
from nemo_minitron.config.parallel import ParallelLayout, validate_parallel, valid_tp_sizes
from nemo_minitron.config.presets import DESCRIPTIONS, PRESETS, get_preset

__all__ = ["ModelConfig", "RopeScaling", "ParallelLayout", "validate_parallel", "valid_tp_sizes",
           "PRESETS", "DESCRIPTIONS", "get_preset"]
