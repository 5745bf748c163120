"""Every job writes its model natively (nemo_minitron/model/save.py): a .nemo saved by all
ranks through Megatron's dist_checkpointing, or an HF directory streamed to rank 0 tensor by tensor.

Run on both stacks: the .nemo a TP=2 x PP=2 job writes loads with megatron-core's own
dist_checkpointing.load (0.7.0 / torch 2.3 on the NeMo 24.05 stack) at TP=1 and TP=2."""
import json
import os
import subprocess

import pytest
import torch

from nemo_minitron.convert import mapping
from nemo_minitron.convert.nemo_file import safe_extract
from tests.convert_helpers import GOLDEN, GOLDEN_CFG, assert_same_tensors, read_hf_dir
from tests.helpers import run_ranks
from tests.test_convert_megatron import _dist_load, _load_nemo
from tests.train_helpers import preimport  # noqa: F401  (warm forked workers)

pytestmark = pytest.mark.megatron
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a vocabulary whose Megatron padding differs between TP=1 (224) and TP=2 (256)
ODD_VOCAB = GOLDEN_CFG.replace(vocab_size=200)


def _hf(tmp_path, cfg=GOLDEN_CFG, seed=7, tokenizer=True):
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    return write_tiny_hf_checkpoint(str(tmp_path / f"hf{seed}_{cfg.vocab_size}"), cfg, seed=seed,
                                    tokenizer=tokenizer)


def _hf_state(hf_dir):
    return read_hf_dir(hf_dir)


def _save(rank, hf_dir, cfg, out, model_dtype="float32", nemo_dir=False, base=None):
    """An fp32 'training' model loaded from ``hf_dir`` (bf16), saved in the config's bf16."""
    from nemo_minitron.model.save import save_model
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.load import load_hf_into_model

    model = build_gpt_model(cfg, dtype=model_dtype, use_te=False)
    load_hf_into_model(model, cfg, hf_dir)
    return save_model(model, cfg, out, base=base or hf_dir, nemo_dir=nemo_dir)


def _expected_megatron(cfg, hf_dir):
    """Full Megatron tensors (bf16) of the HF checkpoint, as test_convert_megatron expects them."""
    return {k: v.to(torch.bfloat16) for k, v in _hf_state(hf_dir).items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The golden model saved as .nemo by a TP=2 x PP=2 job (4 forked gloo ranks) and at TP=1."""
    tmp = tmp_path_factory.mktemp("native")
    hf_dir = _hf(tmp)
    paths = {}
    for name, world, tp, pp in (("tp2pp2", 4, 2, 2), ("tp1", 1, 1, 1)):
        out = str(tmp / name / "m.nemo")
        got = run_ranks(_save, world, tp=tp, pp=pp, args=(hf_dir, GOLDEN_CFG, out))
        assert got[0] == out and all(g is None for g in got[1:])
        assert sorted(os.listdir(tmp / name)) == ["m.nemo"]  # nothing else left next to it
        paths[name] = out
    return hf_dir, paths, tmp


@pytest.mark.parametrize("tp", [1, 2])
def test_tp2_pp2_nemo_loads_bit_exactly_with_megatron_dist_load(saved, tmp_path, tp):
    """What NeMo 24.05's restore does (dist_checkpointing.load into the GPTModel's sharded state
    dict), at TP=1 and TP=2, on this stack's megatron-core."""
    hf_dir, paths, _ = saved
    safe_extract(paths["tp2pp2"], str(tmp_path))
    results = run_ranks(_dist_load, tp, tp=tp,
                        args=(str(tmp_path / "model_weights"), GOLDEN_CFG,
                              _expected_megatron(GOLDEN_CFG, hf_dir)))
    for bad, count in results:
        assert count == 2 + 2 * 6 + 1 and bad == []
    # torch 2.3 reads the metadata (no StorageMeta), tensors are bf16, config records the layout
    from nemo_minitron.checkpoint.untrusted import read_dcp_metadata
    from nemo_minitron.config.nemo import load_yaml

    md = read_dcp_metadata(str(tmp_path / "model_weights"), torch_classes=True)
    assert "storage_meta" not in vars(md)
    dtypes = {v.properties.dtype for v in md.state_dict_metadata.values() if hasattr(v, "chunks")}
    assert dtypes == {torch.bfloat16}
    # the same keys, global shapes and dtypes as the converter's golden file of this model (the
    # per-layer _extra_state objects NeMo 24.05's TE-spec model asks for included); only the
    # chunking differs (TP shards)
    golden = tmp_path / "golden"
    safe_extract(os.path.join(GOLDEN, "torch_dist_tp1.nemo"), str(golden))
    want = read_dcp_metadata(str(golden / "model_weights"), torch_classes=True)

    def summary(m):
        return {k: (tuple(v.size), v.properties.dtype) if hasattr(v, "chunks") else None
                for k, v in m.state_dict_metadata.items()}
    assert summary(md) == summary(want)
    assert len([k for k in summary(md) if "_extra_state/shard_" in k]) == 4 * GOLDEN_CFG.num_layers
    with open(tmp_path / "model_weights" / "metadata.json") as f:
        assert json.load(f)["sharded_backend"] == "torch_dist"
    conf = load_yaml(str(tmp_path / "model_config.yaml"))
    assert (conf["tensor_model_parallel_size"], conf["pipeline_model_parallel_size"]) == (2, 2)
    assert conf["precision"] in ("bf16", "bf16-mixed") and conf["vocab_size"] == 256
    assert os.path.isfile(tmp_path / "tokenizer" / "tokenizer.json")


def test_tp2_pp2_nemo_converts_to_hf_like_the_tp1_save(saved):
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    hf_dir, paths, tmp = saved
    a, _ = nemo_to_hf(paths["tp2pp2"], str(tmp / "hf_a"), progress=False)
    b, _ = nemo_to_hf(paths["tp1"], str(tmp / "hf_b"), progress=False)
    assert_same_tensors(read_hf_dir(a), read_hf_dir(b))
    assert_same_tensors(read_hf_dir(a), _hf_state(hf_dir))  # bf16 in, fp32 model, bf16 out


def test_other_vocab_padding_at_tp2_reads_back(tmp_path):
    """Saved at TP=2 the output layer holds 256 rows, at TP=1 224: nemo-to-hf slices both to the
    vocabulary, and load_nemo_into_model re-pads for the loading TP (full-tensor fallback)."""
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    hf_dir = _hf(tmp_path, ODD_VOCAB, seed=3)
    outs = {}
    for name, world, tp, pp in (("tp2pp2", 4, 2, 2), ("tp1", 1, 1, 1)):
        outs[name] = str(tmp_path / f"{name}.nemo")
        run_ranks(_save, world, tp=tp, pp=pp, args=(hf_dir, ODD_VOCAB, outs[name]))
    a, _ = nemo_to_hf(outs["tp2pp2"], str(tmp_path / "a"), progress=False)
    b, _ = nemo_to_hf(outs["tp1"], str(tmp_path / "b"), progress=False)
    assert_same_tensors(read_hf_dir(a), read_hf_dir(b))
    assert_same_tensors(read_hf_dir(a), _hf_state(hf_dir))
    hf = _expected_megatron(ODD_VOCAB, hf_dir)
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        assert run_ranks(_load_nemo, tp * pp, tp=tp, pp=pp,
                         args=(outs["tp2pp2"], ODD_VOCAB, hf)) == [[]] * (tp * pp)


@pytest.mark.parametrize("form", ["file", "dir"])
def test_tokenizer_comes_from_a_nemo_base(saved, tmp_path, form):
    """A job started from a .nemo (file or extracted) passes on its tokenizer section and packed
    files to a .nemo output, and the files to an HF output; its weights are never read for it."""
    from nemo_minitron.config.nemo import load_yaml

    hf_dir, paths, _ = saved
    base = paths["tp1"]
    if form == "dir":
        base = str(tmp_path / "base")
        os.makedirs(base)
        safe_extract(paths["tp1"], base)
    out_nemo, out_hf = str(tmp_path / "o.nemo"), str(tmp_path / "o_hf")
    for out in (out_nemo, out_hf):
        run_ranks(_save, 1, args=(hf_dir, GOLDEN_CFG, out, "float32", False, base))
    safe_extract(out_nemo, str(tmp_path / "x"))
    safe_extract(paths["tp1"], str(tmp_path / "y"))
    assert load_yaml(str(tmp_path / "x" / "model_config.yaml"))["tokenizer"] == \
        load_yaml(str(tmp_path / "y" / "model_config.yaml"))["tokenizer"]
    with open(os.path.join(hf_dir, "tokenizer.json"), "rb") as f:
        want = f.read()
    for got in (tmp_path / "x" / "tokenizer", tmp_path / "o_hf"):
        got = got / "tokenizer.json"
        assert got.read_bytes() == want


def test_data_parallel_replicas_save_one_copy(tmp_path):
    """TP=1 PP=2 DP=2: the replicas' identical tensors are written once (replica_id)."""
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    hf_dir = _hf(tmp_path)
    out = str(tmp_path / "dp.nemo")
    run_ranks(_save, 4, pp=2, args=(hf_dir, GOLDEN_CFG, out))
    back, _ = nemo_to_hf(out, str(tmp_path / "back"), progress=False)
    assert_same_tensors(read_hf_dir(back), _hf_state(hf_dir))


def test_extracted_nemo_directory(tmp_path):
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    hf_dir = _hf(tmp_path)
    out = str(tmp_path / "out" / "model")  # no .nemo suffix: nemo_dir=True asks for the tree
    run_ranks(_save, 2, tp=2, args=(hf_dir, GOLDEN_CFG, out, "float32", True))
    assert sorted(os.listdir(out)) == ["model_config.yaml", "model_weights", "tokenizer"]
    assert sorted(os.listdir(tmp_path / "out")) == ["model"]
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()
    back, _ = nemo_to_hf(out, str(tmp_path / "back"), progress=False)
    assert_same_tensors(read_hf_dir(back), _hf_state(hf_dir))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- HF output: streamed, equal to the old gather-everything path --------------------------------
def _old_gather_path(model, cfg, out, base):
    """The writer this module replaced (train/export.py before issue #16): TP all-gather, every
    stage's dict gathered on rank 0 at once, mapped and written there."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_minitron.checkpoint.hf_io import write_safetensors_shards
    from nemo_minitron.config.hf import write_hf_config
    from nemo_minitron.model.save import collect_on_rank0

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    offset = mapping.layer_offset(cfg, ps.get_pipeline_model_parallel_rank(), pp)
    stage = {}
    for name, param in sorted(mapping.model_params(model).items()):
        local = param.detach().cpu()
        if tp > 1 and mapping.rule_for(name).tp_dim is not None:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
            local = mapping.tp_unshard(name, shards)
        stage[mapping.to_local_layer(name, -offset)] = local
    full = collect_on_rank0(stage)
    if full is not None:
        os.makedirs(out)
        write_safetensors_shards(((n, t.to(torch.bfloat16)) for n, t in
                                  mapping.megatron_to_hf(cfg, full.__getitem__)), out)
        write_hf_config(cfg, out)


def _save_hf_measured(rank, hf_dir, cfg, out, ref):
    """Old path into ``ref``, new path into ``out``; on rank 0 the full tensors the new path
    fetched are tracked: the most alive at once, and their bytes."""
    import weakref

    from nemo_minitron.model import save as model_out
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.load import load_hf_into_model

    model = build_gpt_model(cfg, dtype="float32", use_te=False)
    load_hf_into_model(model, cfg, hf_dir)
    _old_gather_path(model, cfg, ref, hf_dir)
    alive, peak = {}, {"count": 0, "bytes": 0}
    call = model_out._Fetcher.__call__

    def tracked(self, name):
        full = call(self, name)
        if full is not None:
            key = id(full)
            alive[key] = full.numel() * full.element_size()
            weakref.finalize(full, alive.pop, key, None)
            peak["count"] = max(peak["count"], len(alive))
            peak["bytes"] = max(peak["bytes"], sum(alive.values()))
        return full

    model_out._Fetcher.__call__ = tracked
    try:
        path = model_out.save_model(model, cfg, out, base=hf_dir)
    finally:
        model_out._Fetcher.__call__ = call
    return path, peak


@pytest.mark.parametrize("tp, pp", [(2, 2), (1, 2)], ids=["tp2-pp2", "pp2-dp2"])
def test_hf_output_streams_and_equals_the_old_gather_path(tmp_path, tp, pp):
    hf_dir = _hf(tmp_path, ODD_VOCAB, seed=5)
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    results = run_ranks(_save_hf_measured, 4, tp=tp, pp=pp, args=(hf_dir, ODD_VOCAB, out, ref))
    assert results[0][0] == os.path.abspath(out) and all(r[0] is None for r in results[1:])
    new, old = read_hf_dir(out), read_hf_dir(ref)
    assert_same_tensors(new, old)  # bit for bit, bf16 from an fp32 model
    assert_same_tensors(new, _hf_state(hf_dir))
    with open(os.path.join(out, "model.safetensors.index.json")) as f, \
            open(os.path.join(ref, "model.safetensors.index.json")) as g:
        assert json.load(f)["weight_map"] == json.load(g)["weight_map"]
    with open(os.path.join(out, "config.json")) as f, open(os.path.join(ref, "config.json")) as g:
        assert json.load(f) == json.load(g)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    # memory: rank 0 holds at most two full tensors at once (the one being written, the next
    # fetched), never the model (measured: 2 tensors, 86016 bytes = a layer's fc1 + fc2, of a
    # 336512-byte model)
    peak = results[0][1]
    shapes = mapping.megatron_shapes(ODD_VOCAB, tp).values()
    largest = max(torch.Size(s).numel() for s in shapes) * 2
    total = sum(torch.Size(s).numel() for s in shapes) * 2
    print(f"rank 0 peak: {peak['count']} full tensors, {peak['bytes']} bytes; largest tensor "
          f"{largest} bytes; model {total} bytes")
    assert peak["count"] <= 2 and peak["bytes"] <= 2 * largest < total / 2


# ---- jobs: no converter process, nothing left beside the output ----------------------------------
def _no_subprocess():
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args[:1]}")
    subprocess.Popen = refuse  # subprocess.run goes through Popen (forks are fine: Megatron's)


def _finetune(rank, argv):
    from megatron.core import parallel_state

    from nemo_minitron.cli import load_recipe

    _no_subprocess()
    parallel_state.destroy_model_parallel()  # the recipe sets up Megatron itself
    return load_recipe("finetune").main(argv)


def test_finetune_writes_nemo_with_no_subprocess(tiny_hf_dir, tmp_path):
    pytest.importorskip("tokenizers", reason="finetune tokenizes its data")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"q {i}?", "output": f"a {i}"}) + "\n"
                            for i in range(4)))
    out = str(tmp_path / "job" / "out.nemo")
    argv = ["--config", os.path.join(ROOT, "nemo_minitron/conf/finetune/tiny_sft.yaml"),
            "--model", tiny_hf_dir, "--data", str(data), "--out", out, "trainer.max_steps=1",
            "data.seq_length=32", "model.micro_batch_size=1", "model.global_batch_size=2",
            "trainer.tensor_model_parallel_size=2"]
    assert run_ranks(lambda r: _finetune(r, argv), world_size=2) == [0, 0]
    assert sorted(os.listdir(tmp_path / "job")) == ["out.nemo", "out.nemo.ckpt"]
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    back, _ = nemo_to_hf(out, str(tmp_path / "back"), progress=False)
    assert set(read_hf_dir(back)) == set(read_hf_dir(tiny_hf_dir))


def _distill(rank, argv):
    from megatron.core import parallel_state

    from nemo_minitron.cli import load_recipe

    _no_subprocess()
    parallel_state.destroy_model_parallel()
    recipe = load_recipe("distill")
    recipe.run(recipe.load_recipe_config(None, argv))


def test_distill_writes_nemo_with_no_subprocess(tiny_hf_dir, tmp_path):
    pytest.importorskip("tokenizers", reason="distill tokenizes pydoc")
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    student = write_tiny_hf_checkpoint(str(tmp_path / "student"), "tiny_minitron_width", seed=1)
    out = str(tmp_path / "job" / "student.nemo")
    argv = [f"teacher.restore_from_path={tiny_hf_dir}", f"model.restore_from_path={student}",
            "data.train_ds.file_path=pydoc", "data.train_ds.max_num_samples=4",
            "data.val_samples=0", "data.seq_length=16", "model.micro_batch_size=1",
            "model.global_batch_size=2", "trainer.max_steps=1", "trainer.progress_bar=false",
            f"out={out}", "trainer.pipeline_model_parallel_size=2", "trainer.precision=fp32"]
    run_ranks(lambda r: _distill(r, argv), world_size=2)
    assert sorted(os.listdir(tmp_path / "job")) == ["student.nemo", "student.nemo.ckpt"]
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    back, _ = nemo_to_hf(out, str(tmp_path / "back"), progress=False)
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["hidden_size"] == 48  # the student's architecture


# ---- failures ------------------------------------------------------------------------------------
def _save_then(rank, hf_dir, out, what):
    """A 1-rank save whose weights step fails (``raise``) or is killed (``kill``) midway."""
    from nemo_minitron.model import save as model_out

    real = model_out._torch_dist_save

    def broken(sharded, weights_dir):
        real(sharded, weights_dir)
        if what == "kill":
            os.kill(os.getpid(), 9)
        raise OSError("disk full")

    model_out._torch_dist_save = broken
    return _save(rank, hf_dir, GOLDEN_CFG, out)


@pytest.mark.parametrize("what", ["raise", "kill"])
def test_a_failed_or_killed_save_leaves_only_sweepable_entries(tmp_path, what):
    from nemo_minitron.checkpoint import scratch

    hf_dir = _hf(tmp_path)
    job = tmp_path / "job"
    job.mkdir()
    out = str(job / "m.nemo")
    # raise: the worker reports the error; kill: it never reports (queue.Empty after the timeout)
    with pytest.raises(AssertionError if what == "raise" else Exception,
                       match="disk full" if what == "raise" else None):
        run_ranks(_save_then, 1, args=(hf_dir, out, what), timeout=30)
    if what == "raise":  # the save cleans up after itself
        assert os.listdir(job) == []
        return
    left = os.listdir(job)  # killed: only the owner-named staging directory
    assert len(left) == 1 and left[0].startswith(".m.nemo.save-"), left
    assert scratch.sweep(str(job), ".save-") == [str(job / left[0])]
    assert os.listdir(job) == []


# ---- LoRA: the merged model a training run writes ------------------------------------------------
def _lora_save(rank, hf_dir, cfg, adapter_dir, out):
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.load import load_hf_into_model
    from nemo_minitron.peft import lora
    from nemo_minitron.peft.adapter_io import save_lora_outputs
    from nemo_minitron.train.config import LoRASection

    model = build_gpt_model(cfg, dtype="float32", use_te=False)
    load_hf_into_model(model, cfg, hf_dir)
    spec = LoRASection(rank=4, alpha=8.0)
    lora.apply_lora(model, cfg, spec)
    g = torch.Generator().manual_seed(0)
    full = {}  # non-zero factors (B starts at zero), the same full tensors on every rank
    for layer in range(cfg.num_layers):
        for target in lora.resolve_targets(spec.target_modules):
            n_out, n_in = lora.full_shape(cfg, target)
            full[lora.adapter_key(layer, target, "a")] = 0.1 * torch.randn(4, n_in, generator=g)
            full[lora.adapter_key(layer, target, "b")] = 0.1 * torch.randn(n_out, 4, generator=g)
    lora.load_adapters(model, full)
    return save_lora_outputs(model, cfg, spec, adapter_dir, out, base_dir=hf_dir)


def test_lora_run_at_tp2_pp2_writes_the_offline_merge(tmp_path):
    """The merged .nemo of a TP=2 x PP=2 LoRA run (each rank merges its own shard while saving)
    equals ``merge_lora`` of the same adapter on the full tensors."""
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf
    from nemo_minitron.peft.adapter_io import merge_lora

    hf_dir = _hf(tmp_path)
    adapter_dir, out = str(tmp_path / "run.lora"), str(tmp_path / "run.nemo")
    got = run_ranks(_lora_save, 4, tp=2, pp=2, args=(hf_dir, GOLDEN_CFG, adapter_dir, out))
    assert got[0] == (os.path.abspath(adapter_dir), out)
    ref = merge_lora(hf_dir, adapter_dir, str(tmp_path / "ref"))
    back, _ = nemo_to_hf(out, str(tmp_path / "back"), progress=False)
    new, old = read_hf_dir(back), read_hf_dir(ref)
    assert_same_tensors(new, old)
    assert not torch.equal(new["model.layers.0.self_attn.q_proj.weight"],
                           _hf_state(hf_dir)["model.layers.0.self_attn.q_proj.weight"])


# ---- prune: the student .nemo of a multi-rank pruning job ----------------------------------------
def test_prune_at_tp2_writes_the_nemo_student(tiny_hf_dir, tmp_path):
    """Every rank of a TP=2 pruning job takes part in the student's .nemo save (rank 0 holds the
    sliced tensors); it reads back as the HF student of the same pruning."""
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf
    from tests.test_prune_student import SMALL, _prune_with_recipe

    out, ref = str(tmp_path / "student.nemo"), str(tmp_path / "student_hf")
    for path, world in ((out, 2), (ref, 1)):
        run_ranks(_prune_with_recipe, world, tp=world, args=(
            ["--config", os.path.join(ROOT, "nemo_minitron/conf/prune/tiny.yaml"), "--model",
             tiny_hf_dir, "--out", path, f"tp={world}", *SMALL],))
    assert sorted(os.listdir(tmp_path)) == ["student.nemo", "student.nemo.importance.pt",
                                            "student.nemo.pruning.json", "student_hf"]
    back, _ = nemo_to_hf(out, str(tmp_path / "back"), progress=False)
    assert_same_tensors(read_hf_dir(back), read_hf_dir(ref))
