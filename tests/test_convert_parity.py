"""Logits: the Megatron model built from our .nemo matches transformers (fp32, tol 1e-4) at TP=1
and TP=2; transformers loads our nemo-to-hf output as is and gives identical logits."""
import pytest
import torch

from tests.helpers import run_ranks
from tests.test_mapping import _ids

TOL = 1e-4


def _logits_from_nemo(rank, nemo, cfg, ids):
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.model.load import load_nemo_into_model

    model = build_gpt_model(cfg, dtype="float32")
    load_nemo_into_model(model, cfg, nemo)
    model.eval()
    return full_logits(model, ids, cfg.vocab_size)


@pytest.mark.hf
@pytest.mark.megatron
def test_logits_parity_and_transformers_loads_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config import get_preset
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    hf = write_tiny_hf_checkpoint(str(tmp_path / "hf"), "tiny_llama31", seed=1, dtype="float32")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(_ids()).logits
    nemo = hf_to_nemo(hf, str(tmp_path / "m.nemo"), dtype="fp32")
    cfg = get_preset("tiny_llama31").replace(dtype="float32")
    for tp in (1, 2):
        for got in run_ranks(_logits_from_nemo, tp, tp=tp, args=(nemo, cfg, _ids())):
            assert (got - ref).abs().max().item() < TOL
    assert ref.abs().max().item() > 1.0
    out, _ = nemo_to_hf(nemo, str(tmp_path / "back"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(_ids()).logits, ref)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world").input_ids[0] == 128000
