"""Vocab-parallel KD loss against torch.nn.functional on full logits."""
import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.losses.kd import vocab_parallel_kl
from tests.helpers import run_ranks

V, REAL_V = 96, 90  # padded vocab (e.g. divisor*TP) and the real vocabulary


def _data(seed=0, shape=(5, 3)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, V, generator=g) * 3
    t = torch.randn(*shape, V, generator=g) * 3
    mask = (torch.rand(*shape, generator=g) > 0.3).float()
    return s, t, mask


def _reference(s, t, mask, temperature, reverse):
    """Independent: F.kl_div on the full, unpadded vocabulary."""
    s = s[..., :REAL_V].float() / temperature
    t = t[..., :REAL_V].float() / temperature
    log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if reverse:  # KL(p_s || p_t)
        per_token = F.kl_div(log_pt, log_ps, log_target=True, reduction="none").sum(-1)
    else:  # KL(p_t || p_s)
        per_token = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    return (per_token * mask).sum() / mask.sum() * temperature ** 2


def _grad(fn, s, *args, **kwargs):
    s = s.clone().requires_grad_(True)
    loss = fn(s, *args, **kwargs)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_functional_reference(temperature, reverse):
    s, t, mask = _data()
    ref_loss, ref_grad = _grad(lambda x: _reference(x, t, mask, temperature, reverse), s)
    loss, grad = _grad(lambda x: vocab_parallel_kl(x, t, temperature=temperature, reverse=reverse,
                                                   loss_mask=mask, vocab_size=REAL_V,
                                                   chunk_tokens=4), s)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert grad[..., REAL_V:].abs().max() == 0  # padded ids get nothing
    assert ref_loss > 0.1  # a non-trivial case


def test_identical_student_and_teacher_gives_zero():
    s, _, mask = _data(1)
    loss, grad = _grad(lambda x: vocab_parallel_kl(x, s.clone(), loss_mask=mask, vocab_size=REAL_V), s)
    assert abs(loss.item()) < 1e-6 and grad.abs().max().item() < 1e-6


def test_chunk_size_does_not_change_the_result():
    s, t, mask = _data(2, shape=(7, 2))
    a = vocab_parallel_kl(s, t, loss_mask=mask, chunk_tokens=1)
    b = vocab_parallel_kl(s, t, loss_mask=mask, chunk_tokens=1000)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _tp_worker(rank, s, t, mask, temperature, reverse):
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    part = V // tp
    s_local = s[..., r * part:(r + 1) * part].clone().requires_grad_(True)
    t_local = t[..., r * part:(r + 1) * part].clone()
    loss = vocab_parallel_kl(s_local, t_local, temperature=temperature, reverse=reverse,
                             loss_mask=mask, group=ps.get_tensor_model_parallel_group(),
                             vocab_start=r * part, vocab_size=REAL_V, chunk_tokens=3)
    loss.backward()
    return loss.detach(), s_local.grad


@pytest.mark.megatron
@pytest.mark.parametrize("temperature, reverse", [(1.0, False), (2.0, False), (1.0, True)])
def test_tp2_equals_single_process_reference(temperature, reverse):
    s, t, mask = _data(3)
    ref_loss, ref_grad = _grad(lambda x: _reference(x, t, mask, temperature, reverse), s)
    results = run_ranks(_tp_worker, 2, tp=2, args=(s, t, mask, temperature, reverse))
    for loss, _ in results:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    grad = torch.cat([g for _, g in results], dim=-1)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_shape_mismatch_and_bad_temperature():
    s, t, _ = _data()
    with pytest.raises(ValueError, match="differ in shape"):
        vocab_parallel_kl(s, t[..., :-1])
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_kl(s, t, temperature=0)
