"""Megatron-Core's own dist_checkpointing.load reads our model_weights/ into a GPTModel (TP=1, TP=2
via forked gloo ranks) -- on the current stack and on NeMo 24.05's (megatron-core 0.7.0, torch 2.3,
where it reads the golden torch_dist file the current stack wrote: the StorageMeta fix);
load_nemo_into_model on every layout."""
import os

import pytest
import torch

from nemo_minitron.convert import mapping
from nemo_minitron.convert.nemo_file import safe_extract
from tests.convert_helpers import GOLDEN, GOLDEN_CFG, golden_hf_state
from tests.helpers import run_ranks


def _expected_shards(cfg, hf, tp, tp_rank):
    full = dict(mapping.hf_to_megatron(cfg, hf.__getitem__, tp=tp))
    return {n: mapping.tp_shard(n, t, tp_rank, tp) for n, t in full.items()}


def _dist_load(rank, weights_dir, cfg, hf):
    """What NeMo 24.05's restore does: dist_checkpointing.load into sharded_state_dict("model.")."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.build import build_gpt_model

    model = build_gpt_model(cfg, dtype="bfloat16")
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix="model."), weights_dir)
    model.load_state_dict({k[len("model."):]: v for k, v in loaded.items()})
    tp = ps.get_tensor_model_parallel_world_size()
    want = _expected_shards(cfg, hf, tp, ps.get_tensor_model_parallel_rank())
    got = mapping.model_params(model)
    return sorted(n for n in want if not torch.equal(got[n], want[n])), len(want)


@pytest.mark.megatron
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_dist_load_reads_golden_torch_dist(tmp_path, tp):
    """torch_dist_tp1.nemo was written by this converter on torch 2.13 / megatron-core 0.16."""
    safe_extract(os.path.join(GOLDEN, "torch_dist_tp1.nemo"), str(tmp_path))
    results = run_ranks(_dist_load, tp, tp=tp,
                        args=(str(tmp_path / "model_weights"), GOLDEN_CFG, golden_hf_state()))
    for bad, count in results:
        assert count == 2 + 2 * 6 + 1 and bad == []


@pytest.mark.megatron
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_dist_load_reads_fresh_conversion(tmp_path, tp):
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    hf_dir = write_tiny_hf_checkpoint(str(tmp_path / "hf"), GOLDEN_CFG, seed=7, tokenizer=False)
    nemo = hf_to_nemo(hf_dir, str(tmp_path / "m.nemo"), tokenizer_type="x")
    os.makedirs(tmp_path / "t")
    safe_extract(nemo, str(tmp_path / "t"))
    results = run_ranks(_dist_load, tp, tp=tp,
                        args=(str(tmp_path / "t" / "model_weights"), GOLDEN_CFG, golden_hf_state()))
    assert all(bad == [] for bad, _ in results)


def _load_nemo(rank, nemo_path, cfg, hf):
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.load import load_nemo_into_model

    model = build_gpt_model(cfg, dtype="bfloat16")
    load_nemo_into_model(model, cfg, nemo_path)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    offset = mapping.layer_offset(cfg, ps.get_pipeline_model_parallel_rank(), pp)
    want = _expected_shards(cfg, hf, tp, ps.get_tensor_model_parallel_rank())
    got = mapping.model_params(model)
    names = [n for n, _, _ in mapping.stage_names(cfg, ps.get_pipeline_model_parallel_rank(), pp)]
    return sorted(n for n in names if not torch.equal(got[mapping.to_local_layer(n, offset)], want[n]))


@pytest.mark.megatron
@pytest.mark.parametrize("name, tp, pp", [("zarr_tp2.nemo", 1, 1), ("zarr_tp1.nemo", 2, 1),
                                          ("torch_dist_tp1.nemo", 2, 1),
                                          ("torch_dist_tp1.nemo", 1, 2)])
def test_load_nemo_into_model(name, tp, pp):
    results = run_ranks(_load_nemo, tp * pp, tp=tp, pp=pp,
                        args=(os.path.join(GOLDEN, name), GOLDEN_CFG, golden_hf_state()))
    assert results == [[]] * (tp * pp)
