"""NeMo-style SFT data: JSONL ``{"input": ..., "output": ...}`` -> token samples -> fixed-shape batches.

A sample is ``[BOS] + prompt + answer + [EOS]`` where the prompt is the prompt template's text before
``{output}`` (with ``{input}`` filled in) and the answer is the output text (plus whatever the template
puts after ``{output}``). The two parts are tokenized separately, as NeMo's GPTSFTDataset does, so
the answer's tokens do not depend on the prompt. BOS comes from the tokenizer's own post-processor
(``tokenizer.json`` adds ``<|begin_of_text|>``), exactly as the HF tokenizer adds it.

Training positions: ``input_ids = tokens[:-1]``, ``labels = tokens[1:]``; ``loss_mask`` is 1 where
the label is an answer token or the EOS (answer-only loss). A sample therefore occupies
``len(tokens) - 1`` positions, which must fit ``seq_length``; too long samples lose prompt tokens from
the right (truncation of the input side) or, with truncation off, raise before training starts.

Packing puts several samples into one row of ``seq_length`` positions. Attention stays inside each
sample: a packed batch carries ``attention_mask = SegmentMask(segment_ids)`` (data/packing.py;
``[b, s]``, no ``[s, s]`` tensor), which the SDPA attention runs per sample and which becomes the
block-diagonal causal mask ``[b, 1, s, s]`` only for Megatron's own attention (the fallback,
``packing.attention_mask_for`` at the model call). Position ids restart at 0 for every sample.
(Megatron's local-spec attention applies RoPE by row position, not ``position_ids``; since RoPE
scores depend only on q_pos - k_pos, a block-diagonal mask already makes a packed sample's loss
equal to its unpacked loss up to float rounding; tests/test_train_data.py measured 0.0.)

Dynamic padding (NeMo's ``pad_to_max_length: false``, the default): rows are stored at
``seq_length`` but a micro batch is cut to the longest row it holds, rounded up to a multiple of
:data:`PAD_MULTIPLE` (never past ``seq_length``), so no layer -- the LM head over the whole
vocabulary included -- computes the padding beyond that. Under pipeline parallelism every micro
batch of a global batch gets the same length (the stages exchange ``[s, b, h]`` activations of one
shape per schedule run): the longest row of the whole global batch, the same on every DP rank.
A batch without packing needs no mask at all (``attention_mask=None``: Megatron's and the SDPA
attention then apply their own causal mask, O(1) memory instead of ``[b, 1, s, s]``); padding
sits after every real token, so causal attention never lets a real token see it. Only packed rows
carry a mask (segment ids).

Pretraining-style text (``data.format: text``; pydoc, ``.txt``, JSONL ``text``): :func:`text_data`
cuts the ``<bos> doc <eos>`` token stream into rows whose every position carries loss, the data of
distillation and of teacher correction. :func:`build_datasets` picks between the two for a
recipe's ``data`` section (finetune and distill share it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from nemo_minitron.data.jsonl import iter_jsonl, iter_lines
from nemo_minitron.errors import ConfigError, MinitronError
from nemo_minitron.data.packing import SegmentMask, dense_segment_mask


@dataclass(frozen=True)
class Sample:
    """One tokenized example: ``prompt`` includes BOS; ``answer`` includes EOS."""

    prompt: List[int]
    answer: List[int]

    @property
    def num_positions(self) -> int:
        return len(self.prompt) + len(self.answer) - 1


# ---- reading and tokenizing ---------------------------------------------------------------------
def read_jsonl(path: str, max_num_samples: int = 0) -> List[dict]:
    """The records of an SFT JSONL file; every line must be an object with string input/output."""
    if not path:
        raise MinitronError("no data file given (data.train_ds.file_path)")
    if not os.path.isfile(path):
        raise MinitronError(f"{path}: data file does not exist")
    records = []
    for _, rec in iter_jsonl(path, ("input", "output")):
        records.append(rec)
        if max_num_samples and len(records) >= max_num_samples:
            break
    if not records:
        raise MinitronError(f"{path}: the dataset is empty")
    return records


def split_template(template: str):
    """``"{input}\\n\\n{output}"`` -> ("{input}\\n\\n", ""): prompt part, text after the answer."""
    if template.count("{output}") != 1 or "{input}" not in template:
        raise MinitronError(f"prompt_template {template!r} must contain {{input}} and exactly one "
                            "{output}")
    before, after = template.split("{output}")
    if "{input}" in after:
        raise MinitronError(f"prompt_template {template!r}: {{input}} must come before {{output}}")
    return before, after


class SFTTokenizer:
    """The real Llama-3 tokenizer (``<hf_dir>/tokenizer.json``) applied the SFT way."""

    def __init__(self, hf_dir: str, eos_token_id: Optional[int] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MinitronError("the `tokenizers` package is needed to tokenize SFT data") from None
        path = os.path.join(hf_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise MinitronError(f"{path}: tokenizer file is missing")
        self.tok = Tokenizer.from_file(path)
        self.eos_id = eos_token_id if eos_token_id is not None \
            else self.tok.token_to_id("<|end_of_text|>")
        if self.eos_id is None:
            raise MinitronError(f"{path}: no <|end_of_text|> token and no eos_token_id given")

    def sample(self, record: dict, template: str) -> Sample:
        before, after = split_template(template)
        prompt_text = before.replace("{input}", record["input"])
        prompt = self.tok.encode(prompt_text, add_special_tokens=True).ids  # [BOS] + prompt
        answer = self.tok.encode(record["output"] + after, add_special_tokens=False).ids
        return Sample(prompt=list(prompt), answer=list(answer) + [self.eos_id])


def fit_sample(s: Sample, seq_length: int, truncation: bool, where: str) -> Sample:
    """Cut prompt tokens from the right (keeping the first, BOS) until the sample fits."""
    excess = s.num_positions - seq_length
    if excess <= 0:
        return s
    if not truncation:
        raise MinitronError(f"{where}: {s.num_positions} positions exceed seq_length={seq_length} "
                            "and data.truncation is off")
    if len(s.prompt) - excess < 1:
        raise MinitronError(f"{where}: the answer alone ({len(s.answer)} tokens) does not fit "
                            f"seq_length={seq_length}, even with the whole prompt truncated")
    return Sample(prompt=s.prompt[: len(s.prompt) - excess], answer=s.answer)


def load_sft_samples(path: str, tokenizer: SFTTokenizer, template: str, seq_length: int,
                     truncation: bool = True, max_num_samples: int = 0) -> List[Sample]:
    """Read, tokenize and fit every record (all errors surface here, before any training)."""
    records = read_jsonl(path, max_num_samples)
    return [fit_sample(tokenizer.sample(r, template), seq_length, truncation, f"{path}:{i + 1}")
            for i, r in enumerate(records)]


# ---- rows and batches ---------------------------------------------------------------------------
def pack(samples: Sequence[Sample], seq_length: int) -> List[List[Sample]]:
    """First-fit packing in dataset order: a list of rows, each a list of samples that fit."""
    rows: List[List[Sample]] = []
    room: List[int] = []
    for s in samples:
        n = s.num_positions
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(s)
                room[i] -= n
                break
        else:
            rows.append([s])
            room.append(seq_length - n)
    return rows


def make_row(samples: Sequence[Sample], seq_length: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """One row of ``seq_length`` positions holding ``samples`` back to back, then padding.

    segment_ids: index of the sample per position, -1 on padding (each padding position forms a
    segment of its own for attention, and carries no loss).
    """
    input_ids = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    position_ids = torch.zeros(seq_length, dtype=torch.long)
    segment_ids = torch.full((seq_length,), -1, dtype=torch.long)
    start = 0
    for k, s in enumerate(samples):
        tokens = torch.tensor(s.prompt + s.answer, dtype=torch.long)
        n = len(tokens) - 1
        if start + n > seq_length:
            raise MinitronError(f"row overflows seq_length={seq_length}")
        input_ids[start:start + n] = tokens[:-1]
        labels[start:start + n] = tokens[1:]
        # label j is tokens[j+1]: an answer token when j+1 >= len(prompt)
        loss_mask[start + len(s.prompt) - 1:start + n] = 1.0
        position_ids[start:start + n] = torch.arange(n)
        segment_ids[start:start + n] = k
        start += n
    position_ids[start:] = torch.arange(seq_length - start)
    return dict(input_ids=input_ids, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                segment_ids=segment_ids)


def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> the dense fallback mask [b, 1, s, s] (True = may NOT attend)."""
    return dense_segment_mask(segment_ids)


PAD_MULTIPLE = 16  # dynamic padding rounds a batch's length up to this (NeMo's choice too)


def used_positions(row: Dict[str, torch.Tensor]) -> int:
    """Positions up to and including the row's last real (non-padding) one."""
    real = (row["segment_ids"] >= 0).nonzero()
    return int(real[-1]) + 1 if len(real) else 0


def padded_length(rows: Sequence[Dict[str, torch.Tensor]], seq_length: int) -> int:
    """The longest row's used positions rounded up to PAD_MULTIPLE, at most ``seq_length``."""
    longest = max(max(used_positions(r) for r in rows), 1)
    return min(seq_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def collate(rows: Sequence[Dict[str, torch.Tensor]],
            length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Stack rows into ``[b, length]`` tensors (cut to the first ``length`` positions; None: as
    stored). ``attention_mask``: None without packing (causal attention, see module docstring),
    else a :class:`SegmentMask` over ``segment_ids [b, length]`` (no ``[length, length]`` tensor;
    the model call turns it into the dense mask only for attentions that need one)."""
    batch = {k: torch.stack([r[k] if length is None else r[k][:length] for r in rows])
             for k in rows[0]}
    packed = bool((batch["segment_ids"] > 0).any())
    batch["attention_mask"] = SegmentMask(batch["segment_ids"]) if packed else None
    return batch


class RowBatches:
    """Global batches of training rows by step number, cut into micro batches (the interface the
    Trainer uses). Subclasses define ``__len__``, ``row(i)`` (a :func:`make_row`-style dict) and
    ``global_batch_rows``. The position in the data is the step number alone, so resuming at step
    ``k`` continues with exactly the batches an uninterrupted run would see."""

    seq_length: int
    pad_to_max_length: bool = False  # True: every batch at seq_length (the old fixed padding)

    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, i: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def global_batch_rows(self, step: int, global_batch_size: int) -> List[int]:
        raise NotImplementedError

    def micro_batches(self, step: int, global_batch_size: int, micro_batch_size: int,
                      dp_rank: int = 0, dp: int = 1,
                      same_length: bool = False) -> List[Dict[str, torch.Tensor]]:
        """This DP rank's micro batches of global batch ``step``."""
        return self.rows_to_micro_batches(self.global_batch_rows(step, global_batch_size),
                                          micro_batch_size, dp_rank, dp, same_length)

    def rows_to_micro_batches(self, rows: Sequence[Optional[int]], micro_batch_size: int,
                              dp_rank: int = 0, dp: int = 1,
                              same_length: bool = False) -> List[Dict[str, torch.Tensor]]:
        """Cut a global batch of row indices (None: a filler row without loss) for one DP rank.

        Each micro batch is cut to its longest row (see module docstring); ``same_length`` (PP):
        all of them to the longest row of the whole global batch, every DP rank alike."""
        per_rank = len(rows) // dp
        filler = dict(self.row(0), loss_mask=torch.zeros(self.seq_length))
        every = [filler if r is None else self.row(r) for r in rows]
        picked = every[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        if self.pad_to_max_length:
            fixed = self.seq_length
        elif same_length:
            fixed = padded_length(every, self.seq_length)
        else:
            fixed = None
        out = []
        for i in range(0, per_rank, micro_batch_size):
            chunk = picked[i:i + micro_batch_size]
            out.append(collate(chunk, fixed or padded_length(chunk, self.seq_length)))
        return out

    def num_loss_tokens(self, step: int, global_batch_size: int) -> int:
        """Counted tokens in the whole global batch (the loss is their mean, on every layout)."""
        return int(sum(self.row(r)["loss_mask"].sum() for r in
                       self.global_batch_rows(step, global_batch_size)))

    def eval_batches(self, global_batch_size: int, limit: int = 0) -> Iterator[List[Optional[int]]]:
        """Validation: every row once, in order, in global batches; the last one is filled up
        with rows that carry no loss (None)."""
        n = len(self)
        count = -(-n // global_batch_size)
        if limit:
            count = min(count, limit)
        for i in range(count):
            ids = list(range(i * global_batch_size, (i + 1) * global_batch_size))
            yield [j if j < n else None for j in ids]


class SFTData(RowBatches):
    """Rows (packed or one sample each) and the deterministic global-batch order over them.

    Global batch ``i`` is rows ``order[i*G : (i+1)*G]`` of an endless stream of epochs, each epoch a
    permutation drawn from ``seed + epoch``. Data-parallel rank ``r`` takes the ``r``-th of ``dp``
    equal slices and cuts it into micro batches.
    """

    def __init__(self, samples: Sequence[Sample], seq_length: int, pad_id: int, *,
                 packed: bool = False, shuffle: bool = True, seed: int = 1234,
                 pad_to_max_length: bool = False):
        if not samples:
            raise MinitronError("the dataset is empty")
        groups = pack(samples, seq_length) if packed else [[s] for s in samples]
        self.rows = [make_row(g, seq_length, pad_id) for g in groups]
        self.seq_length, self.shuffle, self.seed = seq_length, shuffle, seed
        self.pad_to_max_length = pad_to_max_length

    def __len__(self):
        return len(self.rows)

    def row(self, i: int) -> Dict[str, torch.Tensor]:
        return self.rows[i]

    def _epoch_order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def global_batch_rows(self, step: int, global_batch_size: int) -> List[int]:
        n = len(self.rows)
        first = step * global_batch_size
        out = []
        for i in range(first, first + global_batch_size):
            epoch, j = divmod(i, n)
            out.append(self._epoch_order(epoch)[j])
        return out

# ---- pretraining-style text and the choice between the two -------------------------------------
def data_format(path: str, fmt: str) -> str:
    """``sft`` or ``text`` for a data source (see DataSection.format)."""
    if fmt in ("sft", "text"):
        return fmt
    if fmt != "auto":
        raise ConfigError(f"data.format={fmt!r}: choose auto, sft or text")
    if path.endswith(".jsonl") and os.path.isfile(path):
        for _, line in iter_lines(path):
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return "text"  # text_data names the bad line
                return "sft" if isinstance(first, dict) and "output" in first else "text"
    return "text"


def check_data_files(data) -> None:
    """A recipe's ``data`` section, read once before any model exists: each file of train_ds and
    validation_ds is UTF-8, and JSONL rows carry the fields of their format (``input``/``output``
    for SFT, ``text`` otherwise). ``pydoc`` (Python's own docs) is text only; indexed datasets
    (``data_prefix``) are checked by ``indexed_data.check_data_source``."""
    from nemo_minitron.data.calibration import BUILTIN
    from nemo_minitron.data.jsonl import check_data_file

    if data.data_prefix is not None:
        return
    for label, ds in (("--data", data.train_ds), ("data.validation_ds.file_path",
                                                  data.validation_ds)):
        if not ds.file_path:
            continue
        fmt = data_format(ds.file_path, data.format)
        if fmt == "sft" or ds.file_path != BUILTIN:  # pydoc as SFT data: "no such file"
            check_data_file(ds.file_path, label, ("input", "output") if fmt == "sft" else ("text",))


def text_data(source: str, tokenizer_dir: str, seq_length: int, *, bos: int, eos: int,
              max_num_samples: int = 0, val_samples: int = 0, shuffle: bool = True,
              seed: int = 1234):
    """Pretraining-style rows from text (pydoc, .txt, .jsonl ``text``): (train, val or None).

    Each sample is ``seq_length + 1`` tokens of the concatenated ``<bos> doc <eos>`` stream
    (``data/calibration.py``); all ``seq_length`` positions carry loss (a one-token "prompt": the
    loss mask starts at 0)."""
    from nemo_minitron.data.calibration import token_samples

    ids = token_samples(source, tokenizer_dir, seq_length,
                        max_num_samples + val_samples if max_num_samples else 0, bos, eos)
    n_train = ids.shape[0] - val_samples
    if n_train < 1:
        raise ConfigError(f"{source!r} yields {ids.shape[0]} samples of {seq_length + 1} tokens: "
                            f"not enough for data.val_samples={val_samples} plus training")
    samples = [Sample(prompt=row[:1].tolist(), answer=row[1:].tolist()) for row in ids]
    train = SFTData(samples[:n_train], seq_length, pad_id=eos, shuffle=shuffle, seed=seed)
    val = SFTData(samples[n_train:], seq_length, pad_id=eos, shuffle=False) if val_samples else None
    return train, val


def build_datasets(d, tokenizer_dir: str, model_cfg, seed: int = 1234):
    """(format, train, val or None) for a recipe's ``data`` section (DataSection): SFT JSONL or
    pretraining-style text, tokenized with ``tokenizer_dir``, or the Megatron indexed datasets of
    ``data.data_prefix`` (format "indexed"); every data error surfaces here."""
    if getattr(d, "data_prefix", None) is not None:  # Megatron indexed datasets
        from nemo_minitron.data.pretrain import indexed_data

        train, val = indexed_data(d.data_prefix, d.splits_string, d.seq_length, shuffle=d.shuffle,
                                  seed=seed)
        return "indexed", train, val
    eos = model_cfg.eos_token_id if isinstance(model_cfg.eos_token_id, int) \
        else model_cfg.eos_token_id[0]
    fmt = data_format(d.train_ds.file_path, d.format)
    if fmt == "sft":
        tok = SFTTokenizer(tokenizer_dir, eos_token_id=eos)

        def build(ds, shuffle):
            samples = load_sft_samples(ds.file_path, tok, d.prompt_template, d.seq_length,
                                       truncation=d.truncation, max_num_samples=ds.max_num_samples)
            return SFTData(samples, d.seq_length, pad_id=eos, packed=d.packed_sequence,
                           shuffle=shuffle, seed=seed, pad_to_max_length=d.pad_to_max_length)

        train = build(d.train_ds, d.shuffle)
        val = build(d.validation_ds, False) if d.validation_ds.file_path else None
        return fmt, train, val
    bos = model_cfg.bos_token_id
    held_out = 0 if d.validation_ds.file_path else d.val_samples
    train, val = text_data(d.train_ds.file_path, tokenizer_dir, d.seq_length, bos=bos, eos=eos,
                           max_num_samples=d.train_ds.max_num_samples, val_samples=held_out,
                           shuffle=d.shuffle, seed=seed)
    if d.validation_ds.file_path:
        val, _ = text_data(d.validation_ds.file_path, tokenizer_dir, d.seq_length, bos=bos, eos=eos,
                           max_num_samples=d.validation_ds.max_num_samples, shuffle=False)
    return fmt, train, val
