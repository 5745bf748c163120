"""apex.transformer.tensor_parallel.layers: NeMo's build_model marks every parameter's tensor-
parallel attributes with apex's helper; megatron-core has the same function (apex's TP code is
the ancestor of megatron-core's)."""
from megatron.core.tensor_parallel.layers import (  # noqa: F401
    set_defaults_if_not_set_tensor_model_parallel_attributes, set_tensor_model_parallel_attributes)
