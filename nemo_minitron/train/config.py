"""The finetune recipe's config: nested dataclasses in NeMo's sections.

They are filled by ``nemo_minitron.config.recipe.load_config`` (the one precedence rule: defaults,
then YAML, then dotted ``key=value`` overrides such as ``trainer.max_steps=20``). Values are plain
data (strings, numbers, booleans), so a config dumps and round-trips cleanly.

Sections follow NeMo's vocabulary (``trainer``, ``model``, ``data``, ``optim``) so a NeMo user
recognises them; names inside keep NeMo's spelling where NeMo has one (``micro_batch_size``,
``global_batch_size``, ``tensor_model_parallel_size``, ``val_check_interval``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class TrainerConfig:
    max_steps: int = 100
    precision: str = "bf16"  # bf16 | fp32 (params and compute; Adam states fp32 either way)
    seed: int = 1234
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    log_every_n_steps: int = 1
    val_check_interval: int = 0  # validate every N steps (0: only at the end, if a val set exists)
    limit_val_batches: int = 0  # global batches per validation (0: the whole validation set)
    ckpt_every_n_steps: int = 0  # distributed checkpoint every N steps (0: only at the end)
    ckpt_dir: Optional[str] = None  # default: <out>.ckpt
    resume: bool = True  # continue from the latest checkpoint in ckpt_dir when there is one
    keep_last_n_ckpts: int = 2
    log_dir: Optional[str] = None  # CSV (+ TensorBoard if installed); default: <ckpt_dir>/logs
    progress_bar: bool = True  # only where stdout is a TTY


@dataclass
class ModelSection:
    restore_from_path: Optional[str] = None  # HF checkpoint directory (the base model)
    micro_batch_size: int = 1
    global_batch_size: int = 8
    activations_checkpoint_granularity: Optional[str] = None  # None | "full"
    activations_checkpoint_num_layers: int = 1  # with "full": layers per recomputed chunk
    # core attention of the local (non-TE) spec: auto (torch SDPA on a GPU, Megatron's
    # DotProductAttention on the CPU) | sdpa | megatron (nemo_minitron/model/attention.py)
    attention_backend: str = "auto"


@dataclass
class DatasetConfig:
    file_path: Optional[str] = None  # JSONL with "input" and "output" fields
    max_num_samples: int = 0  # 0: all


@dataclass
class DataSection:
    train_ds: DatasetConfig = field(default_factory=DatasetConfig)
    validation_ds: DatasetConfig = field(default_factory=DatasetConfig)
    seq_length: int = 2048
    # NeMo's SFT convention: the text before {output} is the prompt (no loss), the rest the answer.
    prompt_template: str = "{input}\n\n{output}"
    truncation: bool = True  # cut the prompt (input side) from the right when a sample is too long
    packed_sequence: bool = False
    # NeMo's name: True pads every batch to seq_length; False (default) pads each micro batch to
    # its longest row, rounded up to a multiple of 16 (under PP: the longest of the global batch)
    pad_to_max_length: bool = False
    shuffle: bool = True
    # Megatron indexed datasets (`nemo-minitron preprocess`), used instead of train_ds/validation_ds
    # when set: NeMo's data_prefix, one prefix or [weight1, prefix1, weight2, prefix2, ...]
    # (pretraining-style rows, loss on every token; nemo_minitron/data/pretrain.py)
    data_prefix: Any = None
    # with data_prefix: train,validation,test shares of each prefix's documents, e.g. "99,1,0"
    # (None: all documents train, no validation)
    splits_string: Optional[str] = None
    # sft: JSONL with "input"/"output" (loss on the answer); text: pydoc, .txt or JSONL "text"
    # (pretraining-style, loss on every token); auto: SFT when the first JSONL record has "output"
    format: str = "sft"  # sft | text | auto
    # text data without a validation file: hold out the last N samples of the training text
    val_samples: int = 0


@dataclass
class OptimSection:
    name: str = "adam"  # AdamW-style decoupled weight decay, as Megatron's "adam"
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0: off
    warmup_steps: int = 10
    decay_steps: int = 0  # cosine decay length after warmup (0: trainer.max_steps - warmup)
    use_distributed_optimizer: bool = False


@dataclass
class LoRASection:
    """LoRA (``peft: lora``; nemo_minitron/peft/lora.py). Targets: Megatron's module names or
    NeMo's (attention_qkv, attention_dense, mlp_fc1, mlp_fc2), or ``all``."""

    target_modules: List[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    rank: int = 16
    alpha: float = 32.0  # scale = alpha / rank
    dropout: float = 0.0  # on the adapter's input
    adapter_dir: Optional[str] = None  # the adapters on their own; default: <out>.lora
    merge: bool = True  # also write base + adapters, merged, to ``out`` (HF dir or .nemo)


@dataclass
class FinetuneConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    peft: str = "none"  # none: full SFT | lora: train adapters only (the base stays frozen)
    lora: LoRASection = field(default_factory=LoRASection)
    out: Optional[str] = None  # the final model: HF checkpoint directory, or a .nemo file
    out_format: str = "auto"  # auto: .nemo file if out ends in .nemo, else HF | nemo_dir: extracted .nemo


# ---- distillation (recipes/distill.py) ----------------------------------------------------------
@dataclass
class TeacherSection:
    restore_from_path: Optional[str] = None  # HF checkpoint directory of the frozen teacher
    precision: Optional[str] = None  # bf16 | fp32; None: trainer.precision (the teacher is never
    # trained, so bf16 only halves its memory and time; the KL is computed in fp32 either way)


@dataclass
class KDSection:
    """Minitron's recipe (shared/FACTS.md section 5): forward KL on logits, T=1, LM loss off."""

    loss: str = "forward_kl"  # forward_kl: KL(teacher || student) | reverse_kl: KL(student || teacher)
    temperature: float = 1.0  # both softmaxes use logits / T; the KL is scaled by T^2
    kd_weight: float = 1.0
    lm_weight: float = 0.0  # > 0: add the student's LM (cross-entropy) loss on the same tokens
    chunk_tokens: int = 128  # tokens per fp32 [chunk, vocab/TP] KL temporary
    # hidden-state cosine losses (nemo_minitron/losses/hidden.py): [[student_layer, teacher_layer],
    # ...], 0-based TransformerLayer indices or "final" (the last layer's output, before the final
    # norm); a learned projection maps the student's width to the teacher's when they differ
    hidden_pairs: List[List[Any]] = field(default_factory=list)
    hidden_weight: float = 1.0  # times the mean over pairs of (1 - cosine), per counted token


@dataclass
class DistillDataSection(DataSection):
    format: str = "auto"  # distillation data is usually text; SFT JSONL is recognised


@dataclass
class DistillConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelSection = field(default_factory=ModelSection)  # the student (trained)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    kd: KDSection = field(default_factory=KDSection)
    data: DistillDataSection = field(default_factory=DistillDataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    out: Optional[str] = None  # the distilled student: HF checkpoint directory, or a .nemo file
    out_format: str = "auto"  # auto: .nemo file if out ends in .nemo, else HF | nemo_dir: extracted .nemo
