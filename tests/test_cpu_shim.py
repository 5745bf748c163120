"""The CPU shim (nemo_minitron/compat/cpu.py) is scoped: deactivate() undoes every global change
activate() made, and `with cpu.active():` limits it to a block."""
import multiprocessing

import pytest
import torch


def _scoped(queue):
    """In a forked child: the test process may already run with the shim active."""
    from nemo_minitron.compat import cpu

    cpu.deactivate()
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.transformer_config import TransformerConfig

    before = (torch.Tensor.cuda, TransformerConfig.__post_init__, mrandom._set_cuda_rng_state,
              list(sys_meta_path()))
    with cpu.active():
        inside = (cpu.is_active(), torch.Tensor.cuda is before[0],
                  TransformerConfig.__post_init__ is before[1], mrandom.torch is torch,
                  torch.ones(2).cuda().device.type)
    after = (torch.Tensor.cuda, TransformerConfig.__post_init__, mrandom._set_cuda_rng_state,
             list(sys_meta_path()))
    queue.put((inside, [a is b for a, b in zip(after[:3], before[:3])], after[3] == before[3],
               cpu.is_active(), mrandom.torch is torch))


def sys_meta_path():
    import sys

    return sys.meta_path


@pytest.mark.megatron
@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op where CUDA is")
def test_the_shim_is_undone_after_its_block():
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_scoped, args=(queue,))
    child.start()
    inside, restored, meta_path_restored, still_active, real_torch = queue.get(timeout=120)
    child.join(timeout=60)
    assert inside == (True, False, False, False, "cpu")  # patched, retargeted, working
    assert restored == [True, True, True] and meta_path_restored  # every change undone
    assert not still_active and real_torch
