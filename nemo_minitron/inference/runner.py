"""One forward step of a tensor- and pipeline-parallel Megatron GPTModel, for inference.

Every rank of a model-parallel group calls the same methods with the same token ids (the token
buffers are replicated on all ranks); the runner moves activations between pipeline stages with
plain ``torch.distributed`` send/recv and returns results on the ranks that need them:

* :meth:`ModelRunner.last_logits` (KV-cache step): full-vocabulary logits of the last position
  ``[b, vocab_size]`` on every last-stage rank (gathered over TP only at that one position), ``None``
  elsewhere. Padded vocabulary ids (``cfg.padded_vocab_size(tp) > vocab_size``) are sliced off, so
  they can never be sampled.
* :meth:`ModelRunner.score` (no cache): log-probability of each next token ``[b, s-1]`` on every
  rank, computed from the vocab-parallel logit shards without ever gathering them.
* :meth:`ModelRunner.broadcast_from_sampler`: the one rank that samples (last stage, TP rank 0)
  shares its decision with every rank, so all ranks agree on the tokens.

Megatron's activations between stages are ``[s, b, hidden]`` in the model's params dtype; sequence
parallelism is off for inference, so every TP rank of a stage holds the full activation and sends it
to the rank with the same TP rank in the next stage.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_minitron.compat import mcore
from nemo_minitron.config.arch import ModelConfig


class ModelRunner:
    """This rank's part of a built GPTModel (``build_gpt_model(cfg, parallel_output=True)``)."""

    def __init__(self, model, cfg: ModelConfig):
        from megatron.core import parallel_state as ps

        if not getattr(model, "parallel_output", True):
            raise ValueError("ModelRunner needs a GPTModel built with parallel_output=True: it "
                             "gathers logits over TP itself, only where needed")
        self.model = model.eval()
        self.cfg = cfg
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.is_first = ps.is_pipeline_first_stage()
        self.is_last = ps.is_pipeline_last_stage()
        self.padded_vocab = cfg.padded_vocab_size(self.tp)
        self.vocab_shard = self.padded_vocab // self.tp  # rows of the output layer on this rank
        self._tp_group = ps.get_tensor_model_parallel_group() if self.tp > 1 else None
        self._tp_src = ps.get_tensor_model_parallel_src_rank()
        self._pp_group = ps.get_pipeline_model_parallel_group() if self.pp > 1 else None
        self._pp_last = ps.get_pipeline_model_parallel_last_rank()
        self._pp_next = ps.get_pipeline_model_parallel_next_rank() if self.pp > 1 else None
        self._pp_prev = ps.get_pipeline_model_parallel_prev_rank() if self.pp > 1 else None
        param = next(model.parameters())
        self.dtype = param.dtype
        from nemo_minitron.dist import compute_device

        self.device = compute_device()

    @classmethod
    def from_hf(cls, model, dtype: str = "float32", use_te=None) -> "ModelRunner":
        """Build this rank's part of ``model`` (an HF directory, a .nemo, or an open
        ``model.source.ModelSource``) and load its weights (Megatron's parallel state must be
        initialized: ``nemo_minitron.dist.init_megatron``). Built without Megatron's random
        init: the load that follows is strict (every weight). Loaded with ``assign=True``:
        inference only reads the weights, so those an HF checkpoint stores as the model wants
        them are the checkpoint's mapped pages, not copies (start-up time)."""
        from nemo_minitron.model.build import build_gpt_model
        from nemo_minitron.model.source import opened

        with opened(model) as source:
            cfg = source.config
            built = build_gpt_model(cfg, dtype=dtype, use_te=use_te, init_weights=False)
            source.load_into(built, assign=True)
        return cls(built, cfg)

    @property
    def is_sampler(self) -> bool:
        """The rank whose choice of tokens every rank adopts: last stage, TP rank 0."""
        return self.is_last and self.tp_rank == 0

    # ---- pipeline plumbing ------------------------------------------------------------------
    def _stage_forward(self, input_ids: torch.Tensor, start: int, **forward_kwargs):
        """Run this stage on ``input_ids`` [b, s] at positions start..start+s-1.

        Returns the model output on the last stage (logits [b, s' , V_local or V]), else ``None``
        after sending the hidden states [s, b, hidden] to the next stage.
        """
        b, s = input_ids.shape
        if not self.is_first:
            hidden = torch.empty(s, b, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(hidden, src=self._pp_prev)
            self.model.set_input_tensor(hidden)
        # Megatron's RoPE takes positions from the cache offset, not from position_ids (which only
        # learned absolute embeddings read); they are passed for completeness.
        position_ids = torch.arange(start, start + s, device=self.device).unsqueeze(0).expand(b, s)
        # attention_mask=None: Megatron builds the causal mask for a multi-token step and uses no
        # mask for a one-token step against the cache (the new token may see every cached one).
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                         **forward_kwargs)
        if not self.is_last:
            dist.send(out.contiguous(), dst=self._pp_next)
            return None
        return out

    # ---- KV-cache decoding ------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_sequence_length: int):
        return mcore.new_kv_cache(batch_size, max_sequence_length)

    @torch.no_grad()
    def last_logits(self, input_ids: torch.Tensor, cache):
        """Feed ``input_ids`` [b, s] after the ``cache``'s tokens; advance the cache by s.

        Returns fp32 logits [b, vocab_size] of the last position on last-stage ranks, else None.
        """
        start = cache.sequence_len_offset
        out = self._stage_forward(input_ids.to(self.device), start,
                                  **mcore.kv_cache_forward_kwargs(cache))
        cache.sequence_len_offset = start + input_ids.shape[1]
        if out is None:
            return None
        logits = out[:, -1, :]  # [b, V_local] (or [b, V] where megatron gathered it)
        if self.tp > 1 and not mcore.kv_cache_logits_gathered():
            logits = mcore.gather_tp_last_dim(logits.contiguous())
        if logits.shape[-1] != self.padded_vocab:
            raise RuntimeError(f"expected {self.padded_vocab} logits per position, got "
                               f"{logits.shape[-1]}")
        return logits[:, : self.cfg.vocab_size].float()

    def broadcast_from_sampler(self, tensor: torch.Tensor) -> torch.Tensor:
        """Give every rank the sampler's ``tensor`` (same shape and dtype everywhere), in place."""
        if self.tp > 1 and self.is_last:
            dist.broadcast(tensor, src=self._tp_src, group=self._tp_group)
        if self.pp > 1:
            dist.broadcast(tensor, src=self._pp_last, group=self._pp_group)
        return tensor

    # ---- scoring (no cache) -----------------------------------------------------------------
    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, greedy: bool = False):
        """log p(input_ids[:, t+1] | input_ids[:, :t+1]) as fp32 [b, s-1], on every rank.

        Uses Megatron's vocab-parallel cross entropy on the [s, b, V/TP] logit shards (three
        all-reduces over TP instead of gathering b*s*V logits). With ``greedy=True`` also returns
        bool [b, s-1]: whether each next token is the argmax (its logit reaches the max over the
        whole vocabulary; two more all-reduces over TP, still without gathering), the ``is_greedy``
        of lm-eval's loglikelihood.
        """
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        input_ids = input_ids.to(self.device)
        b, s = input_ids.shape
        if s < 2:
            raise ValueError("scoring needs at least two tokens per sequence")
        out = self._stage_forward(input_ids, 0)
        result = torch.empty(b, s - 1, dtype=torch.float32, device=self.device)
        is_max = torch.zeros(b, s - 1, dtype=torch.float32, device=self.device)  # 1.0: argmax
        if out is not None:
            if out.shape[-1] != self.vocab_shard:
                raise RuntimeError(f"expected a vocab shard of {self.vocab_shard} logits, got "
                                   f"{out.shape[-1]} (is the model built with parallel_output?)")
            # [s-1, b, V/TP] fp32 (may share memory with ``out``, which is not used afterwards;
            # megatron's cross entropy works on it in place, so the greedy check goes first)
            shard = out[:, :-1, :].transpose(0, 1).float().contiguous()
            first_id = self.tp_rank * self.vocab_shard
            pad_from = self.cfg.vocab_size - first_id  # local column of the first padded id
            if pad_from < self.vocab_shard:
                shard[..., max(pad_from, 0):] = float("-inf")  # padded ids take no probability
            targets = input_ids[:, 1:].transpose(0, 1).contiguous()  # [s-1, b]
            if greedy:  # before the cross entropy, which may modify its input
                is_max.copy_(self._target_is_max(shard, targets, first_id).transpose(0, 1))
            nll = vocab_parallel_cross_entropy(shard, targets)  # [s-1, b]; may modify shard
            result.copy_(-nll.transpose(0, 1))
        if self.pp > 1:  # every TP rank of the last stage holds the same all-reduced values
            dist.broadcast(result, src=self._pp_last, group=self._pp_group)
            if greedy:
                dist.broadcast(is_max, src=self._pp_last, group=self._pp_group)
        return (result, is_max.bool()) if greedy else result

    def _target_is_max(self, shard: torch.Tensor, targets: torch.Tensor,
                       first_id: int) -> torch.Tensor:
        """fp32 [s-1, b]: 1.0 where the target's logit equals the max logit over all TP shards
        (shard: [s-1, b, V/TP] with padded ids at -inf; targets: [s-1, b] global ids)."""
        local = targets - first_id
        inside = (local >= 0) & (local < self.vocab_shard)
        picked = shard.gather(-1, local.clamp(0, self.vocab_shard - 1).unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(inside, picked, torch.zeros_like(picked))  # [s-1, b]
        best = shard.max(-1).values  # [s-1, b]
        if self.tp > 1:
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=self._tp_group)
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=self._tp_group)
        return (target_logit >= best).float()
