"""The streaming pieces of the converters (issue 3): safetensors read tensor by tensor, the .nemo
tar written member by member, torch_dist written chunk by chunk through Megatron's
dist_checkpointing.save in a one-rank world of this process and read in place from the tar.
Checked against independent readers: the safetensors library, GNU tar and Python's tarfile, torch
DCP's own FileSystemReader, torch.save."""
import inspect
import os
import shutil
import subprocess
import tarfile

import pytest
import torch

from nemo_minitron.checkpoint.hf_io import SafetensorsDir, read_weight_map
from nemo_minitron.convert.nemo_file import NemoTarWriter, opened_nemo, pack_nemo
from nemo_minitron.errors import CheckpointError, MinitronError
from tests.convert_helpers import GOLDEN


def _mapped_paths():
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def test_safetensors_dir_matches_library_and_maps_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g).to(torch.bfloat16),
               "b": torch.randn(3, generator=g), "c": torch.arange(6, dtype=torch.int64),
               "d": torch.tensor(2.5, dtype=torch.float16), "e": torch.empty(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reader = SafetensorsDir(str(tmp_path))
    got = {name: reader(name).clone() for name in tensors}
    # each tensor maps only its own pages, unmapped once it is freed (safe_open keeps the whole
    # shard mapped while the handle lives)
    held = reader("a")
    assert str(tmp_path / "model.safetensors") in _mapped_paths()
    del held
    import gc
    gc.collect()
    assert str(tmp_path / "model.safetensors") not in _mapped_paths()
    want = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(want) == sorted(got)
    for name, ref in want.items():
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape
        assert torch.equal(got[name].view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8))
    with pytest.raises(CheckpointError, match="missing"):
        reader("zzz")
    reader.close()
    # a shard cut short is an error naming it, not a short tensor
    path = tmp_path / "model.safetensors"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    reader = SafetensorsDir(str(tmp_path), weight_map={n: "model.safetensors" for n in want})
    with pytest.raises(CheckpointError, match="file ends [0-9]+ bytes early"):
        for name in want:
            reader(name)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_tar_writer_matches_gnu_tar(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    blobs = {"model_config.yaml": b"a: 1\n", "sub/x.bin": os.urandom(70001),
             "sub/deep/" + "long" * 40 + ".distcp": os.urandom(512), "sub/empty": b"",
             ".metadata": os.urandom(1000)}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    out = tmp_path / "o.nemo"
    pack_nemo(str(src), str(out))
    listing = subprocess.run(["tar", "-tf", str(out)], capture_output=True, text=True, check=True)
    names = [n.rstrip("/") for n in listing.stdout.split()]
    assert sorted(n for n in names if n.startswith("./") and n[2:] in blobs) == \
        sorted("./" + n for n in blobs)
    assert "./sub" in names and "./sub/deep" in names
    target = tmp_path / "x"
    target.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(target)], check=True)
    for name, data in blobs.items():
        assert (target / name).read_bytes() == data, name
    with tarfile.open(out) as tar:  # Python's reader agrees, and the archive ends cleanly
        assert {m.name for m in tar.getmembers() if m.isfile()} == {"./" + n for n in blobs}
    assert os.path.getsize(out) % tarfile.RECORDSIZE == 0
    with pytest.raises(MinitronError, match="exists"):
        pack_nemo(str(src), str(out))


def test_tar_writer_removes_temporary_on_error(tmp_path):
    out = tmp_path / "o.nemo"
    with pytest.raises(RuntimeError):
        with NemoTarWriter(str(out)) as tar:
            tar.add_dir("./d")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_torch_dist_read_in_place_from_tar(tmp_path):
    """The golden torch_dist .nemo read without extracting its .distcp files: every recorded
    member range holds the member's bytes, and the reader returns what torch DCP's own
    FileSystemReader reads from an extracted copy."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from nemo_minitron.convert.dist_ckpt import TorchDistReader

    nemo = os.path.join(GOLDEN, "torch_dist_tp1.nemo")
    in_place = {}
    with opened_nemo(nemo, in_place) as root:
        weights = os.path.join(root, "model_weights")
        assert in_place and not [f for f in os.listdir(weights) if f.endswith(".distcp")]
        with tarfile.open(nemo) as tar:
            by_name = {os.path.basename(m.name): tar.extractfile(m).read()
                       for m in tar.getmembers() if m.name.endswith(".distcp")}
        for dest, (archive, offset, size) in in_place.items():
            with open(archive, "rb") as f:
                f.seek(offset)
                assert f.read(size) == by_name[os.path.basename(dest)]
        reader = TorchDistReader(weights, in_place)
        md = reader.metadata
        key = "model.decoder.layers.mlp.linear_fc1.weight"
        shape = md.state_dict_metadata[key].size
        got = torch.stack([reader.get(f"decoder.layers.{i}.mlp.linear_fc1.weight")
                           for i in range(shape[0])])
        emb = reader.get("embedding.word_embeddings.weight")
    extracted = tmp_path / "x"
    extracted.mkdir()
    with tarfile.open(nemo) as tar:
        tar.extractall(extracted, filter="data")
    torch_md = FileSystemReader(str(extracted / "model_weights")).read_metadata()
    ref = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
           for k, v in torch_md.state_dict_metadata.items()
           if isinstance(v, TensorStorageMetadata) and k in (key, "model.embedding.word_embeddings.weight")}
    # torch >= 2.4 asks for no_dist; torch 2.3 infers it (no process group here)
    no_dist = {"no_dist": True} if "no_dist" in inspect.signature(load).parameters else {}
    load(ref, storage_reader=FileSystemReader(str(extracted / "model_weights")), **no_dist)
    assert torch.equal(got, ref[key])
    assert torch.equal(emb, ref["model.embedding.word_embeddings.weight"])


def _metadata_fields(md):
    """Everything the reader uses of a DCP Metadata, as plain values."""
    keys = {k: (tuple(v.size), v.properties.dtype,
                [(tuple(c.offsets), tuple(c.sizes)) for c in v.chunks]) if hasattr(v, "chunks")
            else "bytes" for k, v in md.state_dict_metadata.items()}
    storage = {(i.fqn, tuple(getattr(i, "offset", None) or ())):
               (s.relative_path, s.offset, s.length) for i, s in md.storage_data.items()}
    return keys, storage


@pytest.mark.parametrize("source", ["golden", "current"])
def test_light_metadata_reader_reads_what_torch_reads(tmp_path, tiny_hf_dir, source):
    """``read_dcp_metadata`` (no torch.distributed.checkpoint import) returns the fields torch's
    own ``FileSystemReader`` reads, from a .metadata of the NeMo 24.05 stack (golden: torch 2.3,
    megatron-core 0.7) and from one this stack writes."""
    from torch.distributed.checkpoint import FileSystemReader

    from nemo_minitron.checkpoint import untrusted
    from nemo_minitron.convert import dist_ckpt
    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo

    nemo = os.path.join(GOLDEN, "torch_dist_tp1.nemo") if source == "golden" \
        else hf_to_nemo(tiny_hf_dir, str(tmp_path / "m.nemo"), progress=False)
    with tarfile.open(nemo) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    weights = str(tmp_path / "x" / "model_weights")
    light = dist_ckpt.read_dcp_metadata(weights)
    assert type(light).__module__ == untrusted.__name__  # not torch's classes
    keys, storage = _metadata_fields(light)
    reference = FileSystemReader(weights).read_metadata()
    assert (keys, storage) == _metadata_fields(reference)
    own = untrusted.read_dcp_metadata(weights, torch_classes=True)  # the converter's merge input
    assert type(own) is type(reference) and _metadata_fields(own) == (keys, storage)
    assert any(v != "bytes" for v in keys.values()) and "bytes" in keys.values()


def test_truncated_metadata_is_one_clear_error(tmp_path):
    """A cut-off .metadata: CheckpointError naming the file, no output directory left."""
    from nemo_minitron.convert.nemo_to_hf import nemo_to_hf

    with tarfile.open(os.path.join(GOLDEN, "torch_dist_tp1.nemo")) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    path = tmp_path / "x" / "model_weights" / ".metadata"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable"):
        nemo_to_hf(str(tmp_path / "x"), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_tar_member_is_an_error(tmp_path):
    nemo = os.path.join(GOLDEN, "torch_dist_tp1.nemo")
    with tarfile.open(nemo) as tar:
        last = max((m for m in tar.getmembers() if m.name.endswith(".distcp")),
                   key=lambda m: m.offset_data)
    cut = tmp_path / "cut.nemo"
    with open(nemo, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(last.offset_data + last.size // 2))
    with pytest.raises(CheckpointError, match="truncated|not a readable"):
        with opened_nemo(str(cut), {}):
            pass


def test_read_weight_map_used_by_reader(tiny_hf_dir):
    """The converters' HF reader (pread) returns what the safetensors library loads."""
    from safetensors.torch import load_file

    reader = SafetensorsDir(tiny_hf_dir)
    for shard in sorted(set(read_weight_map(tiny_hf_dir).values())):
        for name, ref in load_file(os.path.join(tiny_hf_dir, shard)).items():
            assert torch.equal(reader(name), ref), name


def _one_rank_world_in_a_group(rank):
    from nemo_minitron.dist import one_rank_world
    from nemo_minitron.errors import MinitronError

    try:
        with one_rank_world():
            return "entered"
    except MinitronError as e:
        return str(e)


@pytest.mark.megatron
def test_one_rank_world_refuses_a_multi_rank_group(tmp_path, tiny_hf_dir):
    """hf-to-nemo sets up (and tears down) its own one-rank gloo group in the calling process;
    inside a process group of several ranks it is a clear error, not a hang."""
    import torch.distributed as dist

    from nemo_minitron.convert.hf_to_nemo import hf_to_nemo
    from tests.helpers import run_ranks

    hf_to_nemo(tiny_hf_dir, str(tmp_path / "m.nemo"), progress=False)
    assert not dist.is_initialized()
    for message in run_ranks(_one_rank_world_in_a_group, 2):
        assert "2-rank process group" in message and "outside the job" in message


def _golden_chunks(cfg, tp=1):
    """(layer-indexed checkpoint name, tensor) chunks as hf-to-nemo makes them: embedding, layers
    two by two, final norm, output layer."""
    from nemo_minitron.convert import mapping
    from nemo_minitron.convert.hf_to_nemo import _chunks
    from tests.convert_helpers import golden_hf_state

    state = golden_hf_state()
    mapped = mapping.hf_to_megatron(cfg, lambda name: state[name], tp=tp)
    per_layer = sum(t.numel() * t.element_size() for n, t in mapping.hf_to_megatron(
        cfg, lambda name: state[name], tp=tp) if mapping.stacked_key(n)[1] == 0)
    return list(_chunks(mapped, per_layer, 2 * per_layer))


@pytest.mark.megatron
@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_megatron_data_files_packed_into_tar_are_megatrons_bytes(tmp_path):
    """hf-to-nemo copies each chunk's data file into its .nemo tar member as Megatron wrote it:
    the members hold exactly the files of a save into a plain directory, the merged .metadata is
    the same, and GNU tar reads the archive."""
    import pickle

    from nemo_minitron.convert.dist_ckpt import save_torch_dist
    from tests.convert_helpers import GOLDEN_CFG

    chunks = _golden_chunks(GOLDEN_CFG)
    assert len(chunks) >= 3  # embedding, layers, ..., output layer
    plain = tmp_path / "plain"
    save_torch_dist(GOLDEN_CFG, iter(chunks), str(plain))
    out = tmp_path / "packed.nemo"
    (tmp_path / "scratch").mkdir()
    with NemoTarWriter(str(out)) as tar:
        tar.add_dir("./model_weights")
        save_torch_dist(GOLDEN_CFG, iter(chunks), str(tmp_path / "rest"),
                        scratch=str(tmp_path / "scratch"), on_data_file=lambda path, name:
                        tar.add_file(path, f"./model_weights/{name}"))
    data_files = sorted(f for f in os.listdir(plain) if f.endswith(".distcp"))
    assert len(data_files) == len(chunks)
    assert sorted(os.listdir(tmp_path / "rest")) == [".metadata", "common.pt", "metadata.json"]
    target = tmp_path / "x"
    target.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(target)], check=True)
    assert sorted(os.listdir(target / "model_weights")) == data_files
    for name in data_files:
        assert (target / "model_weights" / name).read_bytes() == (plain / name).read_bytes(), name
    with open(plain / ".metadata", "rb") as f, open(tmp_path / "rest" / ".metadata", "rb") as g:
        a, b = pickle.load(f), pickle.load(g)
    assert a.state_dict_metadata == b.state_dict_metadata and a.storage_data == b.storage_data
    assert os.listdir(tmp_path / "scratch") == []  # per-chunk scratch dirs removed


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_legacy_files_are_torch_save_of_each_ranks_state_dict(tmp_path, tp, pp):
    """--format legacy writes each rank file as torch.save of that rank's state dict (TP shards,
    stage-local layer numbers, no _extra_state): byte for byte torch.save of the reference state
    dict, each full tensor made once per rank file, and torch.load reads it back."""
    from nemo_minitron.convert import mapping
    from nemo_minitron.convert.legacy import write_legacy
    from nemo_minitron.convert.nemo_file import rank_file
    from tests.convert_helpers import GOLDEN_CFG, golden_hf_state

    cfg, state = GOLDEN_CFG, golden_hf_state()
    fulls = dict(mapping.hf_to_megatron(cfg, lambda name: state[name], tp=tp))
    made = []

    def get_full(name):
        made.append(name)
        return fulls[name]

    write_legacy(cfg, get_full, str(tmp_path / "streamed"), tp, pp, torch.bfloat16)
    assert sorted(set(made)) == sorted(fulls) and len(made) == tp * len(fulls)
    per = cfg.num_layers // pp
    for pp_rank in range(pp):
        names = mapping.stage_names(cfg, pp_rank, pp)
        offset = mapping.layer_offset(cfg, pp_rank, pp)
        for tp_rank in range(tp):
            ref = {}
            for name, _, _ in names:
                shard = mapping.tp_shard(name, fulls[name], tp_rank, tp).clone()
                ref["model." + mapping.to_local_layer(name, offset)] = shard
            for layer in range(per):
                for module in mapping.EXTRA_STATE_MODULES:
                    ref[f"model.decoder.layers.{layer}.{module}._extra_state"] = None
            got = rank_file(str(tmp_path / "streamed"), tp_rank, pp_rank, tp, pp)
            want = tmp_path / "ref" / os.path.basename(got)  # torch names records after the file
            want.parent.mkdir(exist_ok=True)
            torch.save(ref, want)
            with open(got, "rb") as f:
                assert f.read() == want.read_bytes(), got
            loaded = torch.load(got, weights_only=True)
            assert list(loaded) == list(ref)
            assert all(torch.equal(loaded[k], v) for k, v in ref.items() if v is not None)


def _mapped_rss_kb(path):
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return rss


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_drop_mapped_pages_keeps_data_and_frees_resident_pages(tmp_path):
    """Legacy reading drops each written tensor's pages from the mmapped file: the resident set
    shrinks and the tensor still reads its bytes (from the file)."""
    from nemo_minitron.checkpoint.fsutil import drop_mapped_pages

    ref = torch.randn(2048, 1024)  # 8 MiB
    path = tmp_path / "w.ckpt"
    torch.save({"w": ref}, path)
    t = torch.load(path, mmap=True, weights_only=True)["w"]
    assert torch.equal(t, ref)  # every page touched
    before = _mapped_rss_kb(path)
    drop_mapped_pages(t)
    after = _mapped_rss_kb(path)
    assert before >= 8 * 1024 - 8 and after < before - 7 * 1024, (before, after)
    assert torch.equal(t, ref)
