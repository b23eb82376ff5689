"""The project's own SD loop: greedy SD == AR (batch 1 and 4), acceptance on the tiny pair, and at
temperature > 0 the SD sampler keeps the target's distribution (chi-square)."""
import numpy as np
import pytest
import torch
from scipy import stats

from lib.decoding.chain import autoregressive_generate, speculative_generate
from lib.models import load_model


@pytest.fixture(scope="module")
def pair(tiny_models):
    torch.set_num_threads(2)
    return load_model(tiny_models.target), load_model(tiny_models.draft)


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer, shipped_prompts):
    return [tiny_tokenizer.encode(p) for p in shipped_prompts[:12]]


def _eos(tok):
    return {tok.eos_token_id}


def test_greedy_sd_equals_ar_batch1_and_acceptance(pair, prompt_ids, tiny_tokenizer):
    target, draft = pair
    accepted = drafted = 0
    for ids in prompt_ids:
        ar = autoregressive_generate(target, [ids], 64, eos_ids=_eos(tiny_tokenizer))
        sd = speculative_generate(target, draft, [ids], 64, gamma=4, eos_ids=_eos(tiny_tokenizer))
        assert sd.tokens == ar.tokens
        assert sd.finish_reasons == ar.finish_reasons
        assert sum(sd.accepted_per_position[0]) == sd.accepted_tokens[0]
        assert sd.draft_tokens[0] == 4 * sd.num_drafts[0]
        accepted, drafted = accepted + sd.accepted_tokens[0], drafted + sd.draft_tokens[0]
    assert accepted / drafted >= 0.5, f"acceptance {accepted / drafted:.3f} below 0.5 at GAMMA_VALUE=4"


@pytest.mark.parametrize("gamma", [1, 4, 7])
def test_greedy_sd_equals_ar_batch4_ragged(pair, prompt_ids, tiny_tokenizer, gamma):
    """Rows of different prompt lengths accept different numbers of drafts in the same round."""
    target, draft = pair
    batch = prompt_ids[:4]
    assert len({len(p) for p in batch}) > 1
    sd = speculative_generate(target, draft, batch, 48, gamma=gamma, eos_ids=_eos(tiny_tokenizer), pad_id=3)
    for row, ids in enumerate(batch):
        ar = autoregressive_generate(target, [ids], 48, eos_ids=_eos(tiny_tokenizer))
        assert sd.tokens[row] == ar.tokens[0], f"row {row} differs"
    assert len(set(sd.accepted_tokens)) > 1 or len(set(sd.num_drafts)) > 1


def test_batched_ar_equals_single(pair, prompt_ids, tiny_tokenizer):
    target, _ = pair
    batched = autoregressive_generate(target, prompt_ids[:4], 40, eos_ids=_eos(tiny_tokenizer), pad_id=3)
    for row, ids in enumerate(prompt_ids[:4]):
        assert batched.tokens[row] == autoregressive_generate(target, [ids], 40,
                                                              eos_ids=_eos(tiny_tokenizer)).tokens[0]


def test_length_limit_and_timestamps(pair, prompt_ids):
    target, draft = pair
    sd = speculative_generate(target, draft, prompt_ids[:2], 10, gamma=4)
    for row in range(2):
        assert len(sd.tokens[row]) == 10 and sd.finish_reasons[row] == "length"
        assert sd.token_times[row] == sorted(sd.token_times[row])


def _target_joint(target, ids, temperature):
    """Exact target distribution of the first two sampled tokens: p(x1) * p(x2 | x1)."""
    with torch.inference_mode():
        p1 = torch.softmax(target(torch.tensor([ids])).logits[0, -1] / temperature, -1)
        top1 = torch.nonzero(p1 > 1e-4).flatten()
        rows = torch.tensor([ids + [int(t)] for t in top1])
        p2 = torch.softmax(target(rows).logits[:, -1] / temperature, -1)
    return {(int(a), int(b)): float(p1[a] * p2[i, b]) for i, a in enumerate(top1) for b in
            torch.nonzero(p2[i] > 1e-5).flatten()}


def test_sampling_keeps_target_distribution(pair, prompt_ids):
    """Token 2 is a draft position: accepted with min(1, p/q) or resampled from max(0, p - q)."""
    target, draft = pair
    ids, temperature, rows, rounds = prompt_ids[1], 1.0, 500, 6
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for _ in range(rounds):
        out = speculative_generate(target, draft, [ids] * rows, 2, gamma=3, temperature=temperature, generator=gen)
        for toks in out.tokens:
            counts[tuple(toks[:2])] = counts.get(tuple(toks[:2]), 0) + 1
    n = rows * rounds
    joint = _target_joint(target, ids, temperature)
    bins = sorted((p, k) for k, p in joint.items() if p * n >= 5)
    observed = [counts.get(k, 0) for _, k in bins]
    expected = [p * n for p, _ in bins]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    assert len(bins) >= 3, "the test needs a spread-out distribution"
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-3, f"SD samples do not follow the target distribution (p={p_value:.2e})"
    # the check has power: the same samples reject the draft's own distribution
    draft_joint = _target_joint(draft, ids, temperature)
    wrong = [draft_joint.get(k, 1e-9) * n for _, k in bins]
    wrong.append(n - sum(wrong))
    assert stats.chisquare(observed, np.array(wrong) * n / sum(wrong)).pvalue < 1e-6
