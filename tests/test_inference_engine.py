"""KV-cache generation and scoring on real Megatron-Core models (random weights, both stacks).

Self-consistency: cached decoding equals a full re-forward, a batch equals its prompts one by one,
every TP/PP layout equals TP=1 and all ranks agree, sampling is reproducible, padded vocabulary
ids are never produced. Parity with transformers is in test_inference_hf.py.
"""
import math

import pytest
import torch

from nemo_minitron.config import get_preset
from tests.helpers import run_ranks

pytestmark = pytest.mark.megatron

# tiny_llama31 (GQA, head_dim != hidden/heads, llama3 RoPE with a 32-token original context) with
# a 500-token vocabulary: padded to 512 by Megatron, so padded ids exist at TP=1 and TP=2.
CFG = get_preset("tiny_llama31").replace(vocab_size=500, bos_token_id=1, eos_token_id=2)
PROMPTS = [[1, 17, 42, 99, 7, 300, 12], [1, 5], [1, 250, 251, 252, 253, 254, 255, 256, 257, 258,
                                                  259, 260, 261, 262, 263, 264, 265, 266, 267, 268,
                                                  269, 270, 271, 272, 273, 274, 275, 276, 277, 278,
                                                  279, 280, 281, 282, 283, 284, 285]]  # 2..37 tokens
NEW = 12


def _full_logits(runner, ids):
    """Megatron's own full forward without a cache at TP=PP=1: fp32 [b, s, vocab]."""
    ids = torch.tensor(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return runner.model(input_ids=ids, position_ids=pos, attention_mask=None).float()


def _kv_vs_full(rank):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.sampling import SamplingParams
    from tests.inference_utils import random_runner

    runner = random_runner(CFG)
    greedy = SamplingParams(greedy=True, max_new_tokens=NEW, logprobs=True, ignore_eos=True)
    batch = generate(runner, PROMPTS, greedy)
    alone = [generate(runner, [p], greedy)[0] for p in PROMPTS]
    checks = []
    for c in batch:
        seq = c.prompt_ids + c.tokens
        logp = _full_logits(runner, [seq])[0, :, : CFG.vocab_size].log_softmax(-1)
        n = len(c.prompt_ids)
        argmax = logp[n - 1: -1].argmax(-1).tolist()  # what full re-forwards would pick
        lp = logp[n - 1: -1].gather(-1, torch.tensor(c.tokens).unsqueeze(-1)).squeeze(-1)
        checks.append((c.tokens, argmax, (lp - torch.tensor(c.logprobs)).abs().max().item()))
    return checks, [c.tokens for c in batch], [c.tokens for c in alone]


def test_kv_cache_decoding_equals_full_reforward_and_batching_is_invisible():
    checks, batch, alone = run_ranks(_kv_vs_full)[0]
    for tokens, argmax, lp_err in checks:
        assert len(tokens) == NEW
        assert tokens == argmax
        assert lp_err < 1e-4
    assert batch == alone  # prompts of 2..37 tokens decoded together == one at a time


def _everything(rank):
    """Greedy and sampled generation, scores and perplexity at the current layout."""
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.sampling import SamplingParams
    from nemo_minitron.inference.score import perplexity, token_logprobs
    from tests.inference_utils import random_runner

    runner = random_runner(CFG)
    greedy = generate(runner, PROMPTS, SamplingParams(greedy=True, max_new_tokens=NEW,
                                                      logprobs=True, ignore_eos=True))
    sampled = generate(runner, PROMPTS, SamplingParams(temperature=0.8, top_k=50, top_p=0.95,
                                                       seed=7, max_new_tokens=NEW,
                                                       logprobs=True, ignore_eos=True))
    scores = token_logprobs(runner, [c.prompt_ids + c.tokens for c in greedy], batch_size=2)
    ppl = perplexity(runner, PROMPTS, window=8, stride=3)
    flags = token_logprobs(runner, [c.prompt_ids + c.tokens for c in sampled], greedy=True)
    return ([c.tokens for c in greedy], [c.logprobs for c in greedy], [c.tokens for c in sampled],
            [s.tolist() for s in scores], (ppl.nll, ppl.tokens),
            [m.tolist() for _, m in flags])


@pytest.fixture(scope="module")
def tp1_everything():
    return run_ranks(_everything)[0]


def _max_diff(a, b):
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_layouts_match_tp1_and_all_ranks_agree(tp1_everything, tp, pp):
    ref = tp1_everything
    per_rank = run_ranks(_everything, world_size=tp * pp, tp=tp, pp=pp)
    for rank, got in enumerate(per_rank):
        assert got[0] == ref[0], f"rank {rank}: greedy tokens differ from TP=1"
        assert _max_diff(got[1], ref[1]) < 1e-4
        assert got[2] == ref[2], f"rank {rank}: seeded sampled tokens differ from TP=1"
        assert _max_diff(got[3], ref[3]) < 1e-4
        assert got[4][1] == ref[4][1] and abs(got[4][0] - ref[4][0]) < 1e-3
        assert got[5] == ref[5], f"rank {rank}: is-greedy flags differ from TP=1"
        assert got == per_rank[0], f"rank {rank} disagrees with rank 0"


def test_scores_equal_log_softmax_of_full_logits(tp1_everything):
    greedy_tokens, scores, sampled, flags = (tp1_everything[i] for i in (0, 3, 2, 5))

    def check(rank):
        from tests.inference_utils import random_runner

        runner = random_runner(CFG)
        errs = []
        for p, toks, sc in zip(PROMPTS, greedy_tokens, scores):
            seq = p + toks
            logp = _full_logits(runner, [seq])[0, :-1, : CFG.vocab_size].log_softmax(-1)
            ref = logp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
            errs.append((ref - torch.tensor(sc)).abs().max().item())
        argmax_hits = []  # is each next token of prompt + sampled tokens the full argmax?
        for p, toks in zip(PROMPTS, sampled):
            seq = p + toks
            top = _full_logits(runner, [seq])[0, :-1, : CFG.vocab_size].argmax(-1)
            argmax_hits.append((top == torch.tensor(seq[1:])).tolist())
        # perplexity with one window per document == exp(mean NLL of the full forward)
        from nemo_minitron.inference.score import perplexity

        ppl = perplexity(runner, PROMPTS, window=64, stride=64)
        nll = 0.0
        for p in PROMPTS:
            logp = _full_logits(runner, [p])[0, :-1, : CFG.vocab_size].log_softmax(-1)
            nll -= logp.gather(-1, torch.tensor(p[1:]).unsqueeze(-1)).sum().item()
        return (errs, ppl.ppl, math.exp(nll / sum(len(p) - 1 for p in PROMPTS)), ppl.tokens,
                argmax_hits)

    errs, ppl, ref_ppl, tokens, argmax_hits = run_ranks(check)[0]
    assert flags == argmax_hits
    hits = [h for seq in argmax_hits for h in seq]
    assert any(hits) and not all(hits)  # sampled tokens: some are the argmax, some are not
    assert max(errs) < 1e-4
    assert tokens == sum(len(p) - 1 for p in PROMPTS)
    assert ppl == pytest.approx(ref_ppl, rel=1e-5)


def _sampling_checks(rank):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.sampling import SamplingParams
    from tests.inference_utils import random_runner

    runner = random_runner(CFG)
    base = SamplingParams(max_new_tokens=NEW, ignore_eos=True, seed=3)

    def toks(params):
        return [c.tokens for c in generate(runner, PROMPTS, params)]

    return dict(a=toks(base), again=toks(base), other_seed=toks(base.replace(seed=4)),
                greedy=toks(base.replace(greedy=True)), temp0=toks(base.replace(temperature=0.0)),
                top_k1=toks(base.replace(top_k=1, temperature=1.7)),
                tiny_top_p=toks(base.replace(top_p=1e-6)))


def test_seeded_sampling_is_reproducible_and_degenerate_filters_are_greedy():
    r = run_ranks(_sampling_checks)[0]
    assert r["a"] == r["again"]
    assert r["a"] != r["other_seed"]
    assert r["a"] != r["greedy"]
    assert r["greedy"] == r["temp0"] == r["top_k1"] == r["tiny_top_p"]


def _padded_vocab(rank):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.sampling import SamplingParams
    from nemo_minitron.inference.score import token_logprobs
    from tests.inference_utils import random_runner

    runner = random_runner(CFG)
    out = runner.model.output_layer.weight  # [512 / TP, hidden] rows of the padded vocabulary
    first = rank * out.shape[0]
    with torch.no_grad():  # padded rows (ids 500..511) pointing along the hidden state: huge logits
        for row in range(out.shape[0]):
            if first + row >= CFG.vocab_size:
                out[row] = 50.0
    greedy = generate(runner, PROMPTS, SamplingParams(greedy=True, max_new_tokens=NEW,
                                                      ignore_eos=True))
    sampled = generate(runner, PROMPTS, SamplingParams(temperature=5.0, max_new_tokens=NEW,
                                                       ignore_eos=True))
    seqs = [c.prompt_ids + c.tokens for c in greedy]
    scores = token_logprobs(runner, seqs)
    return [c.tokens for c in greedy] + [c.tokens for c in sampled], [s.tolist() for s in scores]


@pytest.mark.parametrize("tp", [1, 2])
def test_padded_vocab_ids_are_never_produced_or_scored(tp):
    assert CFG.padded_vocab_size(tp) == 512
    tokens, scores = run_ranks(_padded_vocab, world_size=tp, tp=tp)[0]
    assert all(0 <= t < CFG.vocab_size for seq in tokens for t in seq)
    # probabilities over the 500 real ids: finite, and they are a distribution (scores <= 0)
    assert all(math.isfinite(s) and s <= 0 for seq in scores for s in seq)


def _eos(rank, eos_after):
    from nemo_minitron.inference.generate import generate
    from nemo_minitron.inference.sampling import SamplingParams
    from tests.inference_utils import random_runner

    cfg = CFG
    runner = random_runner(cfg)
    free = generate(runner, PROMPTS, SamplingParams(greedy=True, max_new_tokens=NEW,
                                                    ignore_eos=True))
    eos = free[0].tokens[eos_after]  # make the 4th token of prompt 0's completion the eos id
    runner.cfg = cfg.replace(eos_token_id=(2, eos))
    stopped = generate(runner, PROMPTS, SamplingParams(greedy=True, max_new_tokens=NEW))
    return eos, [(c.tokens, c.finish_reason) for c in free], \
        [(c.tokens, c.finish_reason) for c in stopped]


def test_generation_stops_at_eos_per_sequence():
    eos, free, stopped = run_ranks(_eos, args=(3,))[0]
    for (free_toks, free_reason), (toks, reason) in zip(free, stopped):
        assert free_reason == "length" and len(free_toks) == NEW
        if eos in free_toks:
            cut = free_toks.index(eos) + 1
            assert (toks, reason) == (free_toks[:cut], "eos")
        else:
            assert (toks, reason) == (free_toks, "length")
    assert stopped[0][0][-1] == eos and len(stopped[0][0]) == 4


def _assign_vs_copy(rank, hf_dir):
    """One HF checkpoint loaded twice at the current layout: copied (training's default) and with
    assign=True (ModelRunner.from_hf); which parameters are the reader's mappings; a write into an
    assigned parameter stays in this process (a private mapping), never reaches the file."""
    from nemo_minitron.convert import mapping
    from nemo_minitron.model.build import build_gpt_model
    from nemo_minitron.model.load import HFReader, load_hf_into_model

    class Recording(HFReader):  # remembers where the tensors it maps lie
        ptrs = set()

        def __call__(self, name):
            tensor = super().__call__(name)
            self.ptrs.add(tensor.data_ptr())
            return tensor

    copied = load_hf_into_model(build_gpt_model(CFG, init_weights=False), CFG, hf_dir)
    reader = Recording(hf_dir)
    assigned = load_hf_into_model(build_gpt_model(CFG, init_weights=False), CFG, hf_dir,
                                  reader=reader, assign=True)
    a, c = mapping.model_params(assigned), mapping.model_params(copied)
    differ = [n for n in c if not torch.equal(a[n], c[n])]
    mapped = sorted(n for n, p in a.items() if p.data_ptr() in reader.ptrs)
    name = next(n for n in mapped if n.endswith("layer_norm_weight"))  # replicated: any TP
    before = a[name].clone()
    with torch.no_grad():
        a[name].add_(1.0)
    again = load_hf_into_model(build_gpt_model(CFG, init_weights=False), CFG, hf_dir)
    return differ, mapped, torch.equal(mapping.model_params(again)[name], before)


@pytest.mark.parametrize("tp", [1, 2])
def test_assigned_weights_equal_copied_ones_and_stay_private(tmp_path, tp):
    from nemo_minitron.checkpoint.tiny import write_tiny_hf_checkpoint

    hf_dir = write_tiny_hf_checkpoint(str(tmp_path / "hf"), CFG, seed=3, dtype="float32",
                                      tokenizer=False)
    for differ, mapped, file_unchanged in run_ranks(_assign_vs_copy, world_size=tp, tp=tp,
                                                    args=(hf_dir,)):
        assert differ == []
        assert file_unchanged
        # stored as the model wants them: mapped, not copied (row blocks of them at TP=2: the
        # column-parallel linear_proj/fc2 shards are not contiguous and are copied)
        assert any(n.endswith("linear_qkv.layer_norm_weight") for n in mapped), mapped
        assert (tp == 1) == any(n.endswith("linear_proj.weight") for n in mapped), mapped
        # merged tensors (fused QKV, gate/up, padded vocab) are built in the parameter itself
        assert not any(n.endswith(("linear_qkv.weight", "linear_fc1.weight",
                                   "word_embeddings.weight")) for n in mapped), mapped
