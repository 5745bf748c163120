"""Import-only stand-in for Transformer Engine, for the megatron-core 0.7.0 test tier on CPU.

megatron-core 0.7.0 imports transformer_engine at module level (transformer_block.py ->
custom_layers/transformer_engine.py) even when the local layer spec is used. This package lets
those imports succeed; instantiating any TE module raises. Test code only: the NeMo 24.05 container
has the real TE, and nothing in nemo_minitron imports this.
"""
from . import common, pytorch  # noqa: F401
