import torch


class _NotOnCpu(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"transformer_engine stand-in: {type(self).__name__} needs the real "
                           "Transformer Engine and a GPU")


class Linear(_NotOnCpu):
    pass


class LayerNormLinear(_NotOnCpu):
    pass


class LayerNormMLP(_NotOnCpu):
    pass


class DotProductAttention(_NotOnCpu):
    pass


class LayerNorm(_NotOnCpu):
    pass


class TransformerLayer(_NotOnCpu):  # NeMo 2.0.0rc0 subclasses it at import (full-TE-layer spec)
    pass


class RMSNorm(_NotOnCpu):
    pass


def fp8_autocast(*args, **kwargs):
    raise RuntimeError("transformer_engine stand-in: fp8 needs the real Transformer Engine")
