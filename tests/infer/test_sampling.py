"""Logit filters against brute-force definitions and transformers' logits processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omnilm.infer.sampling import SamplingParams, apply_repetition_penalty, filter_logits, next_token


def kept(logits: torch.Tensor) -> torch.Tensor:
    return logits > torch.finfo(logits.dtype).min


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(top_p):
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 2
    ours = kept(filter_logits(logits, top_p=top_p))
    probs = logits.softmax(-1)
    for row in range(logits.shape[0]):  # brute force: grow the set from the most likely token
        order = probs[row].argsort(descending=True)
        size = int((probs[row][order].cumsum(0) < top_p).sum()) + 1
        expected = torch.zeros(50, dtype=torch.bool)
        expected[order[:size]] = True
        assert torch.equal(ours[row], expected)
        assert probs[row][ours[row]].sum() >= top_p - 1e-6
    hf = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(ours, hf > -float("inf"))


def test_top_k_and_min_p_match_transformers():
    torch.manual_seed(1)
    logits = torch.randn(16, 40)
    hf_topk = TopKLogitsWarper(5)(None, logits.clone()) > -float("inf")
    assert torch.equal(kept(filter_logits(logits, top_k=5)), hf_topk)
    assert kept(filter_logits(logits, top_k=5)).sum(-1).eq(5).all()
    hf_minp = MinPLogitsWarper(0.2)(None, logits.clone()) > -float("inf")
    assert torch.equal(kept(filter_logits(logits, min_p=0.2)), hf_minp)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    history = torch.randint(0, 30, (3, 8))
    seen = torch.zeros(3, 30, dtype=torch.bool).scatter(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.5), expected)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    params = SamplingParams(temperature=1.0, top_p=0.8)
    tokens = next_token(logits, params, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    # top_p=0.8 keeps {0.5, 0.3}: renormalised 0.625 / 0.375, never tokens 2 or 3.
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=-0.1), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(min_p=1.5), dict(repetition_penalty=0),
                                 dict(num_beams=0)])
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_top_p_zero_keeps_only_the_most_likely_token():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]]).expand(500, -1)
    params = SamplingParams(temperature=1.0, top_p=0.0)
    tokens = next_token(logits, params, generator=torch.Generator().manual_seed(0))
    assert tokens.tolist() == [1] * 500
