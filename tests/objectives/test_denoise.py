"""BART noising transforms: properties each must keep, checked on random documents."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.objectives.denoise import (
    Compose,
    DocumentRotation,
    SentencePermutation,
    TextInfilling,
    TokenDeletion,
    TokenMasking,
    bart_noising,
)

MASK, DOT = 4, 5
docs = st.lists(st.integers(6, 60), min_size=1, max_size=200)
seeds = st.integers(0, 2**31)


@settings(max_examples=80, deadline=None)
@given(tokens=docs, seed=seeds, prob=st.floats(0, 1))
def test_masking_and_deletion(tokens, seed, prob):
    masked = TokenMasking(MASK, prob)(tokens, np.random.default_rng(seed))
    assert len(masked) == len(tokens)
    assert all(m in (t, MASK) for m, t in zip(masked, tokens, strict=True))
    kept = TokenDeletion(prob)(tokens, np.random.default_rng(seed))
    it = iter(tokens)
    assert all(any(k == t for t in it) for k in kept)  # a subsequence of the original


@settings(max_examples=80, deadline=None)
@given(tokens=docs, seed=seeds, ratio=st.sampled_from([0.1, 0.3, 0.5]))
def test_infilling_masks_spans_and_keeps_the_rest_in_order(tokens, seed, ratio):
    infill = TextInfilling(MASK, ratio, 3.0)
    out = infill(tokens, np.random.default_rng(seed))
    kept = [t for t in out if t != MASK]
    it = iter(tokens)
    assert all(any(k == t for t in it) for k in kept)
    removed = len(tokens) - len(kept)
    assert removed <= round(len(tokens) * ratio)
    assert all(not (a == MASK and b == MASK) for a, b in zip(out, out[1:], strict=False))  # spans merged


def test_infilling_span_lengths_are_poisson_three():
    infill = TextInfilling(MASK, 0.3, 3.0)
    lengths = [n for s in range(200) for n in infill.span_lengths(1000, np.random.default_rng(s))[:-1]]
    assert abs(np.mean(lengths) - 3.0) < 0.1 and abs(np.var(lengths) - 3.0) < 0.3


@settings(max_examples=80, deadline=None)
@given(tokens=st.lists(st.integers(5, 30), min_size=1, max_size=120), seed=seeds)
def test_permutation_and_rotation_keep_the_multiset(tokens, seed):
    rng = np.random.default_rng(seed)
    permuted = SentencePermutation((DOT,))(tokens, rng)
    assert sorted(permuted) == sorted(tokens)
    sentences = lambda ts: sorted(" ".join(map(str, ts)).replace(f"{DOT} ", f"{DOT}|").split("|"))  # noqa: E731
    assert sentences(permuted) == sentences(tokens) or tokens[-1] != DOT
    rotated = DocumentRotation()(tokens, rng)
    doubled = tokens + tokens
    assert any(doubled[i:i + len(tokens)] == rotated for i in range(len(tokens)))


def test_compose_applies_in_order_and_defaults_follow_bart():
    tokens = list(range(6, 40)) + [DOT] + list(range(6, 20)) + [DOT]
    noising = bart_noising(MASK, [DOT])
    assert [type(t).__name__ for t in noising.transforms] == ["SentencePermutation", "TextInfilling"]
    assert Compose(())(tokens, np.random.default_rng(0)) == tokens
    assert MASK in noising(tokens, np.random.default_rng(0))
