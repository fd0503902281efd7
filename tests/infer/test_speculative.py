"""Speculative decoding: greedy output equals the target's own, sampled tokens follow the target's distribution."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from helpers import small_model
from omnilm.infer.generate import generate_ids
from omnilm.infer.sampling import SamplingParams, probabilities
from omnilm.infer.speculative import speculative_generate, verify
from omnilm.model.transformer import Transformer

PROMPT = [5, 17, 3, 42]
TINY_PROMPT = [5, 3]  # fits the 12-token vocabulary
ALPHA = 0.001


def greedy_reference(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return [int(step) for step in generate_ids(model, [prompt], params)]


def perturbed_copy(model: Transformer, scale: float, seed: int) -> Transformer:
    """The model with Gaussian noise on every weight: a draft that agrees with the target only part of the time."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return noisy


def check_goodness_of_fit(samples: list[int], expected_probs: torch.Tensor) -> None:
    """Chi-square test of ``samples`` against ``expected_probs``; rare tokens are pooled into one cell."""
    counts = Counter(samples)
    n = len(samples)
    expected = (expected_probs.double() / expected_probs.double().sum() * n).tolist()
    impossible = [t for t, e in enumerate(expected) if e == 0 and counts[t]]
    assert not impossible, f"sampled tokens of probability zero: {impossible}"
    common = [t for t, e in enumerate(expected) if e >= 5]
    observed_cells = [counts[t] for t in common]
    expected_cells = [expected[t] for t in common]
    rest_expected = n - sum(expected_cells)
    if rest_expected > 1e-9:
        observed_cells.append(n - sum(observed_cells))
        expected_cells.append(rest_expected)
    assert len(observed_cells) >= 2
    # Float32 probabilities leave the totals a rounding error apart, which chisquare refuses.
    expected_cells = [e * n / sum(expected_cells) for e in expected_cells]
    result = chisquare(observed_cells, expected_cells)
    assert result.pvalue > ALPHA, (observed_cells, expected_cells)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_target_with_a_different_draft(family: str) -> None:
    target = small_model(family, seed=0)
    draft = small_model(family, seed=1, n_layer=1, d_model=32, n_head=2)
    reference = greedy_reference(target, PROMPT, 40)
    tokens, stats = speculative_generate(target, draft, PROMPT, SamplingParams(max_new_tokens=40, temperature=0.0),
                                         k=3)
    assert tokens == reference
    assert stats["proposed"] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_target_with_a_partly_agreeing_draft(family: str) -> None:
    # A noisy copy accepts some proposals and rejects others, so both the accept and the rollback paths run.
    target = small_model(family, seed=0)
    draft = perturbed_copy(target, scale=0.05, seed=7)
    reference = greedy_reference(target, PROMPT, 48)
    for k in (1, 4):
        tokens, stats = speculative_generate(target, draft, PROMPT, SamplingParams(max_new_tokens=48, temperature=0),
                                             k=k)
        assert tokens == reference
        assert 0 < stats["accepted"] < stats["proposed"]
        assert stats["target_forward_passes"] < 1 + 48


def test_identical_draft_accepts_everything() -> None:
    target = small_model("llama", seed=0)
    for params in (SamplingParams(max_new_tokens=33, temperature=0.0), SamplingParams(max_new_tokens=33, seed=3)):
        tokens, stats = speculative_generate(target, target, PROMPT, params, k=4)
        assert len(tokens) == 33
        assert stats["accepted"] == stats["proposed"] > 0
        assert stats["acceptance_rate"] == 1.0
        # Prefill + rounds of k accepted tokens plus the bonus token.
        assert stats["target_forward_passes"] == 1 + -(-33 // 5)


def test_stops_at_eos_and_max_new_tokens() -> None:
    target = small_model("llama", seed=0)
    draft = perturbed_copy(target, scale=0.05, seed=7)
    reference = greedy_reference(target, PROMPT, 30)
    eos = reference[9]
    first = reference.index(eos)
    tokens, _ = speculative_generate(target, draft, PROMPT, SamplingParams(max_new_tokens=30, temperature=0),
                                     k=4, eos_ids=[eos])
    assert tokens == reference[:first + 1]
    for limit in (1, 2, 7):
        tokens, _ = speculative_generate(target, target, PROMPT, SamplingParams(max_new_tokens=limit, seed=0), k=4)
        assert len(tokens) == limit


def test_single_token_prompt() -> None:
    target, draft = small_model("gpt2", seed=0), small_model("gpt2", seed=2)
    tokens, _ = speculative_generate(target, draft, [9], SamplingParams(max_new_tokens=12, temperature=0), k=2)
    assert tokens == greedy_reference(target, [9], 12)


def test_refuses_mismatched_vocabularies_and_repetition_penalty() -> None:
    target = small_model("llama", seed=0)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, small_model("llama", vocab_size=100), PROMPT, SamplingParams())
    with pytest.raises(ValueError, match="repetition_penalty"):
        speculative_generate(target, target, PROMPT, SamplingParams(repetition_penalty=1.2))


def test_cache_truncate_then_recompute_matches_fresh_pass() -> None:
    model = small_model("llama", seed=0)
    ids = torch.tensor([PROMPT + [8, 9, 10, 11]])
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(ids, cache=cache)
        cache.truncate(5)
        replaced = torch.tensor([[30, 31, 32]])
        cached_logits = model(replaced, cache=cache)
        fresh = model(torch.cat([ids[:, :5], replaced], dim=1))[:, 5:]
    assert cache.length == 8
    torch.testing.assert_close(cached_logits, fresh, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        cache.truncate(9)


def test_acceptance_rule_reproduces_the_target_distribution() -> None:
    # Hand-made p and q that disagree strongly; proposals drawn from q, outcome of position 0 counted.
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.1, 0.2, 0.3, 0.2, 0.2]])
    q = torch.tensor([[0.05, 0.05, 0.3, 0.4, 0.2]])
    generator = torch.Generator().manual_seed(0)
    firsts, seconds_after_2 = [], []
    for _ in range(20000):
        proposal = int(torch.multinomial(q[0], 1, generator=generator))
        kept, following = verify(p, q, [proposal], generator)
        firsts.append(proposal if kept else following)
        if kept:
            seconds_after_2.append(following)
    check_goodness_of_fit(firsts, p[0])
    # After an accepted proposal the bonus token comes from the next target distribution.
    check_goodness_of_fit(seconds_after_2, p[1])


def _first_tokens(target: Transformer, draft: Transformer, params: SamplingParams, seeds: range) -> list[list[int]]:
    outputs = []
    for seed in seeds:
        tokens, _ = speculative_generate(target, draft, TINY_PROMPT, params, k=2,
                                         generator=torch.Generator().manual_seed(seed))
        outputs.append(tokens)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=6)])
def test_sampled_tokens_follow_the_target_distribution(settings: dict[str, float]) -> None:
    vocab = 12
    target = small_model("llama", seed=0, vocab_size=vocab, init_std=0.05)
    draft = small_model("llama", seed=5, vocab_size=vocab, init_std=0.05, n_layer=1, d_model=32, n_head=2)
    params = SamplingParams(max_new_tokens=2, **settings)
    outputs = _first_tokens(target, draft, params, range(3000))
    with torch.no_grad():
        prompt = torch.tensor([TINY_PROMPT])
        target_first = probabilities(target(prompt)[0, -1], params)
        draft_first = probabilities(draft(prompt)[0, -1], params)
    # The draft must really differ, or the test would not exercise rejections.
    assert (target_first - draft_first).abs().sum() > 0.2
    check_goodness_of_fit([tokens[0] for tokens in outputs], target_first)
    # Second token given the most frequent first token: the target's conditional distribution.
    top = Counter(tokens[0] for tokens in outputs).most_common(1)[0][0]
    with torch.no_grad():
        target_second = probabilities(target(torch.tensor([TINY_PROMPT + [top]]))[0, -1], params)
    check_goodness_of_fit([tokens[1] for tokens in outputs if tokens[0] == top], target_second)
