"""Test-only stand-in for NVIDIA apex (not on PyPI; NeMo 24.05's container has it), for running the
real NeMo 2.0.0rc0 ``MegatronGPTModel`` on a CPU (tests/test_nemo_real.py).

It provides exactly apex's microbatch calculator -- the one piece of apex that NeMo 2.0.0rc0's GPT
model, its DDP strategy and ``initialize_model_parallel_for_nemo`` require (each imports it in a
``try`` and refuses to run without it) -- with apex's semantics: a constant number of micro batches
``global_batch_size // (micro_batch_size * data_parallel_size)``. Every other apex module is
absent, so NeMo's other ``try: from apex... import`` guards (fused norms, fused Adam, fused
softmax) still see no apex and take their torch paths, as they do on a machine without apex.
"""
