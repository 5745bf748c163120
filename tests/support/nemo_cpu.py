"""The real NeMo 2.0.0rc0 (``nemo_toolkit``, NeMo 24.05's version) on a CPU, for
tests/test_nemo_real.py. Test-only stand-ins, each for something that exists only on a GPU machine
with NVIDIA's builds (the 24.05 container), kept as small as the restore and forward need:

* ``apex`` (tests/support/apex_stub): NVIDIA apex is not on PyPI. Only its microbatch calculator
  and apex's ``set_defaults_if_not_set_tensor_model_parallel_attributes`` (megatron-core's own
  function under apex's name), which NeMo's GPT model, DDP strategy and model builder import.
* ``transformer_engine`` (tests/support/te_stub, shared with the megatron-core 0.7 tier):
  import-only; NeMo builds every layer spec's *description* at model construction, including
  TE's, whose classes refuse to be instantiated here.
* NeMo's ``nlp_overrides.HAVE_APEX`` set to True: its guard also imports apex.contrib's
  DistributedFusedAdam (a CUDA extension), which a restore and a forward never use; and
  ``parallel_adapters.HAVE_APEX``: its guard imports apex's MixedFusedLayerNorm, which only adapters
  with a norm build (LoRA's have none: ``norm_position`` None).
* A torch RMSNorm for megatron-core 0.7's local spec (``FusedLayerNorm``, apex's, supports only
  LayerNorm; the final norm is TE's ``TENorm``): nemo_minitron.compat.mcore.RMSNorm, HF's formula.
* Megatron's model-parallel RNG seeded: NeMo seeds it only when ``torch.cuda.device_count() > 0``.
* nemo_minitron.compat.cpu (our CUDA-to-CPU shim) extended to ``nemo.*``: NeMo's own
  ``torch.cuda.FloatTensor`` / ``current_device()`` calls in text generation; the model's
  ``.cuda()`` (NeMo's ModelPT.cuda builds ``torch.device("cuda", i)``) leaves it where it is.

Everything else is NeMo's and megatron-core 0.7.0's own code.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
APEX_STUB = os.path.join(HERE, "apex_stub")
TE_STUB = os.path.join(HERE, "te_stub")


def enable() -> None:
    """Install the stand-ins; call before importing NeMo. Idempotent."""
    for path in (APEX_STUB, TE_STUB):
        if path not in sys.path:
            sys.path.insert(0, path)
    from nemo_minitron.compat import cpu

    cpu.extend_to("nemo")
    cpu.activate()
    import apex.transformer.pipeline_parallel.utils as microbatches
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import transformer_block
    from nemo.collections.nlp.parts import nlp_overrides

    from nemo_minitron.compat.mcore import RMSNorm

    from nemo.collections.nlp.modules.common.megatron.adapters import parallel_adapters

    nlp_overrides.HAVE_APEX = True
    parallel_adapters.HAVE_APEX = True
    nlp_overrides.get_num_microbatches = microbatches.get_num_microbatches
    gpt_layer_specs.FusedLayerNorm = RMSNorm
    transformer_block.TENorm = RMSNorm


def cpu_trainer(precision=32):
    """What NeMo's scripts build (MegatronTrainerBuilder), on the CPU with one process. NeMo's
    scripts restore one model per process; the tests restore several, so the process-wide
    microbatch calculator (apex's global) is cleared for each new trainer."""
    import apex.transformer.pipeline_parallel.utils as microbatches
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy
    from pytorch_lightning import Trainer

    microbatches._GLOBAL_NUM_MICROBATCHES_CALCULATOR = None

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from nemo_minitron.dist import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    return Trainer(accelerator="cpu", devices=1, num_nodes=1, precision=precision, logger=False,
                   enable_checkpointing=False, strategy=NLPDDPStrategy())


def after_restore(model, seed: int = 1234):
    """The two things a GPU machine has after NeMo's restore: a seeded model-parallel RNG and a
    model that ``.cuda()`` leaves in place."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model.cuda = lambda *args, **kwargs: model
    return model
