"""Every job reads a .nemo natively (nemo_minitron/model/source.py): a tar (data files read in
place) or an extracted directory fills a model at TP=2, PP=2 and TP=2 x PP=2 bit for bit as the HF
directory does; each rank reads only its own shards; generate, eval-ppl, finetune, distill and
lora merge give on a .nemo what they give on the HF directory (prune: test_prune_student.py's
test_nemo_teacher_to_nemo_student), with no temporary HF copy and no temporary left behind;
corrupt inputs are one-line errors."""
import os
import tarfile

import pytest
import torch

from nemo_minitron.convert import mapping
from nemo_minitron.errors import CheckpointError
from tests.helpers import run_ranks


@pytest.fixture(scope="module")
def tiny_nemo(tiny_hf_dir, tmp_path_factory):
    """The tiny teacher as a .nemo tar (torch_dist, tokenizer packed) and extracted."""
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo
    from nemo_minitron.convert.nemo_file import safe_extract

    root = tmp_path_factory.mktemp("nemo")
    nemo = hf_to_nemo(tiny_hf_dir, str(root / "tiny.nemo"))
    extracted = root / "extracted"
    extracted.mkdir()
    safe_extract(nemo, str(extracted))
    return nemo, str(extracted)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def _load_both(rank, hf_dir, path):
    """(names whose parameter differs between the HF load and ``path``'s, bytes read by the
    .nemo load, bytes of this rank's parameters)."""
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.source import ModelSource

    with ModelSource(hf_dir) as hf:
        want = hf.load_into(build_gpt_model(hf.config, dtype="bfloat16", init_weights=False))
    with ModelSource(path) as source:
        cfg = source.config
        model = build_gpt_model(cfg, dtype="bfloat16", init_weights=False)
        before = _rchar()
        source.load_into(model)
        read = _rchar() - before
    got = dict(model.named_parameters())
    bad = [n for n, p in want.named_parameters() if not torch.equal(p, got[n])]
    return bad, read, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.megatron
@pytest.mark.parametrize("extracted", [False, True], ids=["tar", "dir"])
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_nemo_fills_model_like_hf(tiny_hf_dir, tiny_nemo, tp, pp, extracted):
    path = tiny_nemo[1] if extracted else tiny_nemo[0]
    results = run_ranks(_load_both, tp * pp, tp=tp, pp=pp, args=(tiny_hf_dir, path))
    for bad, read, own in results:
        assert bad == []
        assert read < 1.1 * own + (1 << 20)  # its own shards (and the small files), no more


def _read_bytes(rank, path):
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.source import ModelSource

    with ModelSource(path) as source:
        model = build_gpt_model(source.config, dtype="bfloat16", init_weights=False)
        before = _rchar()
        source.load_into(model)
        return _rchar() - before


@pytest.mark.megatron
def test_bytes_read_per_rank(tiny_nemo, tiny_hf_dir):
    """Each rank of PP=2 (its stage) and of TP=2 (its rows of every stored layer, which the .nemo
    holds whole: written at TP=1) reads about half the weights from the tar.
    Measured (tiny teacher, 33.4 MB of bf16 weights): PP=2 16.9 MB, TP=2 17.1 MB per rank."""
    from nemo_minitron.config.hf import read_hf_config

    cfg = read_hf_config(tiny_hf_dir)
    total = sum(int(torch.Size(s).numel()) for s in mapping.megatron_shapes(cfg).values()) * 2
    pp2 = run_ranks(_read_bytes, 2, pp=2, args=(tiny_nemo[0],))
    tp2 = run_ranks(_read_bytes, 2, tp=2, args=(tiny_nemo[0],))
    print(f"weights {total} B; per-rank read PP=2 {pp2}, TP=2 {tp2}")
    assert all(r < 0.55 * total for r in pp2 + tp2)


# ---- cheap errors --------------------------------------------------------------------------------
def test_config_and_tokenizer_without_weights(tiny_nemo, tiny_hf_dir):
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.model.source import ModelSource

    for path in tiny_nemo:
        with ModelSource(path) as source:
            assert source.kind == "nemo" and source.layout() == "torch_dist"
            assert source.config.replace(dtype="bfloat16") == \
                read_hf_config(tiny_hf_dir).replace(dtype="bfloat16")
            with open(os.path.join(source.tokenizer_dir, "tokenizer.json"), "rb") as f, \
                    open(os.path.join(tiny_hf_dir, "tokenizer.json"), "rb") as g:
                assert f.read() == g.read()
    with ModelSource(tiny_hf_dir) as source:
        assert source.kind == "hf" and source.tokenizer_dir == tiny_hf_dir
    # NeMo 24.05's default (zarr): its config is read before any weight is extracted
    from tests.convert_helpers import GOLDEN

    with ModelSource(os.path.join(GOLDEN, "zarr_tp2.nemo")) as source:
        assert source.config.num_layers > 0
        assert "model_weights" not in os.listdir(source.small_root)
        assert source.layout() == "zarr"  # now extracted


@pytest.mark.parametrize("bad", ["missing", "notnemo", "truncated", "garbage"])
def test_corrupt_nemo_is_one_line_error(tmp_path, tiny_nemo, bad):
    from nemo_minitron.model.source import ModelSource

    path = str(tmp_path / "x.nemo")
    if bad == "notnemo":
        os.makedirs(path[:-5])
        path = path[:-5]
    elif bad == "truncated":
        with open(tiny_nemo[0], "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
    elif bad == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a tar" * 100)
    with pytest.raises(CheckpointError) as e:
        with ModelSource(path) as source:
            source.config
            source.layout()
    assert "\n" not in str(e.value)


def _tamper(src: str, dst: str, member_suffix: str, data: bytes) -> None:
    """Copy the tar ``src`` to ``dst`` with the member ending in ``member_suffix`` replaced."""
    import io

    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            if m.isfile() and m.name.endswith(member_suffix):
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)


def _load_err(rank, path):
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.source import ModelSource

    with ModelSource(path) as source:
        model = build_gpt_model(source.config, dtype="bfloat16", init_weights=False)
        try:
            source.load_into(model)
        except CheckpointError as e:
            return str(e)
    return None


@pytest.mark.megatron
def test_hostile_tensor_record_refused_before_megatron(tmp_path, tiny_nemo):
    """A tensor record whose pickle names anything but a tensor is refused before DCP (whose
    torch 2.3 reader would torch.load it without weights_only) sees it."""
    from nemo_minitron.checkpoint.untrusted import read_dcp_metadata
    from nemo_minitron.convert.nemo_file import safe_extract

    d = tmp_path / "x"
    d.mkdir()
    safe_extract(tiny_nemo[0], str(d))
    weights = d / "model_weights"
    md = read_dcp_metadata(str(weights))
    index, info = next((i, s) for i, s in md.storage_data.items()
                       if hasattr(md.state_dict_metadata[i.fqn], "chunks"))
    data_file = weights / info.relative_path
    raw = bytearray(data_file.read_bytes())
    record = bytes(raw[info.offset:info.offset + info.length])
    assert b"_rebuild_tensor_v2" in record
    raw[info.offset:info.offset + info.length] = record.replace(b"_rebuild_tensor_v2",
                                                                b"_rebuild_tensor_v9")
    data_file.write_bytes(bytes(raw))
    [err] = run_ranks(_load_err, 1, args=(str(d),))
    assert err and "refused" in err and "\n" not in err


@pytest.mark.megatron
def test_missing_data_member_is_one_line_error(tmp_path, tiny_nemo):
    bad = str(tmp_path / "bad.nemo")
    with tarfile.open(tiny_nemo[0]) as tin, tarfile.open(bad, "w") as tout:
        for m in tin:
            if not m.name.endswith(".distcp") or m.name.endswith("__0_0.distcp"):
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    [err] = run_ranks(_load_err, 1, args=(bad,))
    assert err and "__1_0.distcp" in err and "\n" not in err


# ---- the jobs: a .nemo gives what the HF directory gives, nothing converted, no temporary left ---
def _clean(fn):
    """``fn(rank, *args)`` in a worker whose temp dir is ``scratch/rank<r>`` and where any .nemo
    -> HF conversion fails; returns (result, what is left in that temp dir)."""
    def worker(rank, scratch, *args):
        import tempfile

        import nemo_minitron.convert.nemo_to_hf as nemo_to_hf
        from megatron.core import parallel_state

        def no_conversion(*_a, **_k):
            raise AssertionError("a .nemo was converted to a temporary HF copy")

        nemo_to_hf.nemo_to_hf = no_conversion
        tempfile.tempdir = os.path.join(scratch, f"rank{rank}")
        os.makedirs(tempfile.tempdir)
        parallel_state.destroy_model_parallel()  # the job sets up Megatron itself
        result = fn(rank, *args)
        # multiprocessing's own directory (removed when the worker exits) aside
        return result, [e for e in os.listdir(tempfile.tempdir) if not e.startswith("pymp-")]
    return worker


def _both(fn, world, hf_args, nemo_args):
    """fn's results on the HF inputs and on the .nemo inputs (each: one per rank)."""
    import shutil
    import tempfile

    out = []
    for args in (hf_args, nemo_args):
        scratch = tempfile.mkdtemp(prefix="ns-")  # short: multiprocessing puts sockets there
        try:
            results = run_ranks(_clean(fn), world, args=(scratch, *args))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        assert all(left == [] for _, left in results), results  # no temporary left behind
        out.append([r for r, _ in results])
    return out


def _generate(rank, model):
    import io

    from nemo_minitron.inference.job import GenerateJobConfig, run_generate

    [c] = run_generate(GenerateJobConfig(model=model, prompt="The capital of France is", tp=2,
                                         greedy=True, max_new_tokens=6, logprobs=True,
                                         dtype="float32"), stdout=io.StringIO())
    return c.tokens, c.logprobs


def _perplexity(rank, model, doc):
    import io

    from nemo_minitron.inference.job import PerplexityJobConfig, run_perplexity

    r = run_perplexity(PerplexityJobConfig(model=model, data=doc, pp=2, window=32, stride=16,
                                           dtype="float32"), stdout=io.StringIO())
    return r.ppl, r.mean_nll, r.tokens


@pytest.mark.megatron
@pytest.mark.hf
def test_generate_and_eval_ppl_nemo_equals_hf(tiny_hf_dir, tiny_nemo, tmp_path):
    pytest.importorskip("transformers")
    hf, nemo = _both(_generate, 2, (tiny_hf_dir,), (tiny_nemo[0],))
    assert hf == nemo and hf[0][0]  # greedy tokens and their logprobs, bit for bit (TP=2)
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    hf, nemo = _both(_perplexity, 2, (tiny_hf_dir, str(doc)),
                     (tiny_nemo[1], str(doc)))
    assert hf == nemo  # PP=2, the extracted directory


QA = [("What is the capital of France?", "Paris."), ("2 + 3 =", "5")]


def _finetune(rank, conf, argv):
    from nemo_minitron.cli import load_recipe

    recipe = load_recipe("finetune")
    state = recipe.run(recipe.load_recipe_config(conf, argv))
    return [m["loss"] for m in state.history]


@pytest.mark.megatron
def test_finetune_nemo_equals_hf(tiny_hf_dir, tiny_nemo, tmp_path):
    import json

    pytest.importorskip("tokenizers", reason="SFT data is tokenized")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QA))
    conf = os.path.join(os.path.dirname(__file__), "..", "nemo_minitron", "conf", "finetune",
                        "tiny_sft.yaml")

    def argv(model, out):
        return [f"model.restore_from_path={model}", f"data.train_ds.file_path={data}",
                f"out={tmp_path / out}", "trainer.max_steps=2", "trainer.precision=fp32",
                "trainer.tensor_model_parallel_size=2", "trainer.progress_bar=false"]

    hf, nemo = _both(_finetune, 2, (conf, argv(tiny_hf_dir, "a")),
                     (conf, argv(tiny_nemo[0], "b")))
    assert hf == nemo and len(hf[0]) == 2  # the losses, bit for bit (TP=2)
    with open(tmp_path / "b.ckpt" / "run.json") as f:  # the run names the user's .nemo
        assert tiny_nemo[0] in f.read()


def _distill(rank, argv):
    from nemo_minitron.cli import load_recipe

    recipe = load_recipe("distill")
    state = recipe.run(recipe.load_recipe_config(None, argv))
    return [(m["kl"], m["loss"]) for m in state.history]


@pytest.mark.megatron
def test_distill_nemo_teacher_and_student_equal_hf(tiny_hf_dir, tiny_nemo, tmp_path):
    pytest.importorskip("tokenizers", reason="pydoc text is tokenized")
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    student = write_tiny_hf_checkpoint(str(tmp_path / "student"), "tiny_minitron_width", seed=1)
    student_nemo = hf_to_nemo(student, str(tmp_path / "student.nemo"), progress=False)

    def argv(teacher, student, out):
        return [f"teacher.restore_from_path={teacher}", f"model.restore_from_path={student}",
                "data.train_ds.file_path=pydoc", "data.train_ds.max_num_samples=8",
                "data.seq_length=32", "trainer.precision=fp32", "trainer.progress_bar=false",
                "model.micro_batch_size=2", "model.global_batch_size=4", "trainer.max_steps=2",
                "trainer.pipeline_model_parallel_size=2", f"out={tmp_path / out}"]

    hf, nemo = _both(_distill, 2, (argv(tiny_hf_dir, student, "a"),),
                     (argv(tiny_nemo[0], student_nemo, "b"),))
    assert hf == nemo and len(hf[0]) == 2  # KL and loss per step, bit for bit (PP=2)


@pytest.mark.megatron
def test_shards_not_covering_the_model_is_one_line_error(tmp_path, tiny_nemo):
    import pickle

    from nemo_minitron.checkpoint.untrusted import read_dcp_metadata
    from nemo_minitron.convert.nemo_file import safe_extract

    d = tmp_path / "x"
    d.mkdir()
    safe_extract(tiny_nemo[0], str(d))
    weights = str(d / "model_weights")
    md = read_dcp_metadata(weights, torch_classes=True)
    key = "model.decoder.layers.mlp.linear_fc2.weight"
    md.state_dict_metadata[key].chunks.pop()  # one layer's chunk of the stack is gone
    with open(os.path.join(weights, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    [err] = run_ranks(_load_err, 2, tp=2, args=(str(d),))[:1]
    assert err and "incomplete" in err and key in err and "\n" not in err


def test_lora_merge_nemo_base_equals_hf_base(tiny_hf_dir, tiny_nemo, tmp_path):
    """`lora merge` on a .nemo base (read in this process, no conversion) writes what it writes
    on the HF directory, tokenizer files included."""
    import types

    import nemo_minitron.convert.nemo_to_hf as nemo_to_hf
    from nemo_minitron.checkpoint.hf_io import iter_tensors
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.peft import lora
    from nemo_minitron.peft.adapter_io import adapter_meta, merge_lora, save_adapter

    pytest.importorskip("safetensors")
    cfg = read_hf_config(tiny_hf_dir)
    spec = types.SimpleNamespace(target_modules=["linear_qkv", "linear_fc2"], rank=2, alpha=4.0,
                                 dropout=0.0)
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in range(cfg.num_layers):
        for target in spec.target_modules:
            out, inp = lora.full_shape(cfg, target)
            tensors[lora.adapter_key(layer, target, "a")] = torch.randn(2, inp, generator=gen)
            tensors[lora.adapter_key(layer, target, "b")] = torch.randn(out, 2, generator=gen)
    adapter = save_adapter(tensors, adapter_meta(cfg, spec), str(tmp_path / "adapter"))
    a = merge_lora(tiny_hf_dir, adapter, str(tmp_path / "from_hf"))
    original = nemo_to_hf.nemo_to_hf
    nemo_to_hf.nemo_to_hf = None  # never called: no temporary HF copy
    try:
        b = merge_lora(tiny_nemo[0], adapter, str(tmp_path / "from_nemo"))
    finally:
        nemo_to_hf.nemo_to_hf = original
    ta, tb = dict(iter_tensors(a)), dict(iter_tensors(b))
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    for name in ("config.json", "tokenizer.json"):
        with open(os.path.join(a, name), "rb") as f, open(os.path.join(b, name), "rb") as g:
            assert f.read() == g.read(), name


@pytest.mark.megatron
@pytest.mark.parametrize("fmt, stored_tp, tp, pp", [("legacy", 2, 1, 2), ("zarr", 2, 2, 1)])
def test_legacy_and_zarr_fill_model_like_hf(tiny_hf_dir, tmp_path, fmt, stored_tp, tp, pp):
    """Per-rank legacy files (written at TP=2) resharded to the job's layout; NeMo 24.05's zarr
    (the golden file, written by megatron-core 0.7 at TP=2) likewise."""
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo
    from tests.convert_helpers import GOLDEN

    if fmt == "zarr":
        from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
        from tests.convert_helpers import GOLDEN_CFG, GOLDEN_SEED

        hf = write_tiny_hf_checkpoint(str(tmp_path / "hf"), GOLDEN_CFG, seed=GOLDEN_SEED,
                                      tokenizer=False)
        nemo = os.path.join(GOLDEN, "zarr_tp2.nemo")
    else:
        hf = tiny_hf_dir
        nemo = hf_to_nemo(tiny_hf_dir, str(tmp_path / "l.nemo"), fmt=fmt, tp=stored_tp,
                          progress=False)
    for bad, _, _ in run_ranks(_load_both, tp * pp, tp=tp, pp=pp, args=(hf, nemo)):
        assert bad == []


@pytest.mark.megatron
def test_other_vocab_padding_layers_as_shards_vocab_repadded(tmp_path):
    """Written at TP=1 with 96 vocabulary rows, loaded at TP=2 (which pads to 128): the layers
    load through Megatron as shards, the embedding and output layer are re-padded."""
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint
    from nemo_minitron.config import get_preset
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    cfg = get_preset("tiny_llama31").replace(vocab_size=96)
    assert cfg.padded_vocab_size(1) == 96 and cfg.padded_vocab_size(2) == 128
    hf = write_tiny_hf_checkpoint(str(tmp_path / "hf"), cfg, seed=4, tokenizer=False)
    nemo = hf_to_nemo(hf, str(tmp_path / "v.nemo"), tokenizer_type="x", progress=False)
    for bad, read, own in run_ranks(_load_both, 4, tp=2, pp=2, args=(hf, nemo)):
        assert bad == [] and read < 1.1 * own + (1 << 20)
