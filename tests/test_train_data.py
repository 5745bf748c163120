"""SFT data: answer-only loss mask against the real tokenizer, truncation, clear errors, and packed
batches giving the same per-sequence loss as unpacked ones through the real Megatron model."""
import json

import pytest
import torch

from nemo_minitron.errors import MinitronError
from nemo_minitron.data.training import (Sample, SFTData, SFTTokenizer, attention_mask, fit_sample,
                                      load_sft_samples, make_row, read_jsonl)
from tests.helpers import run_ranks
from tests.train_helpers import EOS, SEQ, synthetic_samples, write_small_vocab_checkpoint

TEMPLATE = "Question: {input}\nAnswer: {output}"


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_answer_only_mask_matches_the_tokenizer(tiny_hf_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="needs the tokenizers library")
    tok = tokenizers.Tokenizer.from_file(f"{tiny_hf_dir}/tokenizer.json")
    path = _jsonl(tmp_path / "d.jsonl", [{"input": "What is the capital of France?",
                                          "output": "Paris."}])
    [s] = load_sft_samples(path, SFTTokenizer(tiny_hf_dir), TEMPLATE, seq_length=64)
    prompt = tok.encode("Question: What is the capital of France?\nAnswer: ").ids
    answer = tok.encode("Paris.", add_special_tokens=False).ids
    assert prompt[0] == 128000  # <|begin_of_text|>, added by the tokenizer's post-processor
    assert s.prompt == prompt and s.answer == answer + [128001]
    row = make_row([s], 64, pad_id=128001)
    n = len(prompt) + len(answer)  # positions: tokens - 1 (= n + 1 - 1)
    counted = row["labels"][row["loss_mask"].bool()].tolist()
    assert counted == answer + [128001]  # exactly the answer and EOS carry loss
    assert tok.decode(counted[:-1]) == "Paris."
    assert row["input_ids"][:n].tolist() == prompt + answer
    assert row["loss_mask"][n:].sum() == 0


def test_hf_tokenizer_adds_the_same_bos(tiny_hf_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    ours = SFTTokenizer(tiny_hf_dir).sample({"input": "Hi there", "output": "Hello"}, "{input} {output}")
    assert ours.prompt == hf("Hi there ").input_ids
    assert ours.answer[-1] == hf.eos_token_id


def test_truncation_cuts_the_prompt_from_the_right():
    s = Sample(prompt=[1] + list(range(10, 30)), answer=[5, 6, 7, EOS])
    cut = fit_sample(s, seq_length=10, truncation=True, where="x")
    assert cut.num_positions == 10 and cut.answer == s.answer
    assert cut.prompt == s.prompt[:7]  # BOS and the start of the prompt survive
    with pytest.raises(MinitronError, match=r"x: 24 positions exceed seq_length=10 and "
                                            r"data.truncation is off"):
        fit_sample(s, seq_length=10, truncation=False, where="x")
    with pytest.raises(MinitronError, match="answer alone"):
        fit_sample(Sample(prompt=[1], answer=list(range(20))), 10, True, "y")


def test_bad_input_is_reported_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a", "answer": "b"}\n')
    with pytest.raises(MinitronError, match=r"bad.jsonl:2: missing or non-string field\(s\) 'output'"):
        read_jsonl(str(bad))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MinitronError, match="empty.jsonl: the dataset is empty"):
        read_jsonl(str(tmp_path / "empty.jsonl"))
    (tmp_path / "nojson.jsonl").write_text("{input: 1}\n")
    with pytest.raises(MinitronError, match=r"nojson.jsonl:1: not valid JSON"):
        read_jsonl(str(tmp_path / "nojson.jsonl"))
    with pytest.raises(MinitronError, match="does not exist"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_block_diagonal_causal_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = ~attention_mask(seg)[0, 0]  # True = may attend
    expect = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                           [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]).bool()
    assert torch.equal(allowed, expect)


def _per_sequence_losses(rank, hf_dir, packed, causal_only=False, backend="megatron"):
    """Sum of answer-token losses per sample, in dataset order, from the real Megatron model
    (``sdpa``: packed rows through the per-segment path, no [s, s] mask)."""
    from nemo_minitron.config.hf import read_hf_config
    from nemo_minitron.model.attention import attention_mask_for
    from nemo_minitron.train.model import build_train_model

    cfg = read_hf_config(hf_dir)
    model = build_train_model(cfg, precision="fp32", hf_dir=hf_dir,
                              attention_backend=backend).eval()
    samples = synthetic_samples(8)
    data = SFTData(samples, SEQ, EOS, packed=packed, shuffle=False)
    out = {}
    with torch.no_grad():
        for r, row in enumerate(data.rows):
            b = data.rows_to_micro_batches([r], 1)[0]
            if causal_only:  # negative control: packed rows without the block mask
                b["attention_mask"] = attention_mask(torch.zeros_like(b["segment_ids"]))
            loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                         attention_mask=attention_mask_for(model, b["attention_mask"]),
                         labels=b["labels"])[0]
            for k in range(int(row["segment_ids"].max()) + 1):  # b: the row cut to its length
                sel = (b["segment_ids"][0] == k) & b["loss_mask"][0].bool()
                out.setdefault(r, []).append(float(loss[sel].sum()))
    flat = [v for r in sorted(out) for v in out[r]]  # first-fit keeps dataset order within rows
    return len(data), flat


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return write_small_vocab_checkpoint(str(tmp_path_factory.mktemp("hf") / "small"))


@pytest.mark.parametrize("backend", ["megatron", "sdpa"])
def test_packed_and_unpacked_give_the_same_per_sequence_loss(small_hf, backend):
    (rows_u, unpacked), (rows_p, packed), (_, no_mask) = [
        run_ranks(lambda r: _per_sequence_losses(r, small_hf, p, c, backend))[0]
        for p, c in ((False, False), (True, False), (True, True))]
    assert rows_u == 8 and rows_p < rows_u  # packing did pack
    order = _packed_order()
    packed_by_sample = [packed[order.index(i)] for i in range(8)]
    # RoPE at shifted absolute positions could differ by rounding; measured: 0.0 (0.16.1)
    assert packed_by_sample == pytest.approx(unpacked, rel=1e-4)
    assert [no_mask[order.index(i)] for i in range(8)] != pytest.approx(unpacked, rel=1e-2)


def _packed_order():
    """Sample indices in the order the packed rows hold them."""
    from nemo_minitron.data.training import pack

    samples = synthetic_samples(8)
    ids = {id(s): i for i, s in enumerate(samples)}
    return [ids[id(s)] for row in pack(samples, SEQ) for s in row]


def test_one_rule_for_text_files(tmp_path):
    """A text file is one document for every command that reads text (prune's calibration,
    distillation / teacher correction text, eval-ppl); JSONL holds one document per line."""
    from nemo_minitron.data.calibration import iter_documents
    from nemo_minitron.inference.job import read_documents

    txt = tmp_path / "a.txt"
    txt.write_text("para one\n\npara two\n")
    assert list(iter_documents(str(txt))) == read_documents(str(txt)) == ["para one\n\npara two\n"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert list(iter_documents(str(jsonl))) == read_documents(str(jsonl)) == ["one", "two"]
