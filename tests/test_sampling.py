"""Sampling filters against transformers' logits warpers (the reference), and parameter checks."""
import pytest
import torch

from nemo_minitron.errors import ConfigError
from nemo_minitron.inference.sampling import SamplingParams, filter_logits


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 20, 1.0),
                                                       (1.0, 0, 0.9), (1.3, 50, 0.8)])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p):
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 3
    ref = logits.clone()
    for warper in ([lp.TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
                  ([lp.TopKLogitsWarper(top_k)] if top_k else []) + \
                  ([lp.TopPLogitsWarper(top_p)] if top_p < 1.0 else []):
        ref = warper(None, ref)
    ours = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"), (dict(top_k=-1), "top_k=-1"),
    (dict(temperature=-1.0), "temperature=-1.0"), (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(stop=[""]), "non-empty strings"), (dict(seed=-3), "seed=-3")])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("]", "\\]")):
        SamplingParams(**kwargs)
