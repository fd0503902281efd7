"""T5 span corruption: lengths as T5 computes them, and every corrupted pair restores the original window."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.objectives.span_corruption import (
    SpanCorruptionConfig,
    _lengths,
    compute_input_and_target_lengths,
    corrupt_spans,
    random_spans_noise_mask,
    span_corruption_batch,
)

SENTINELS = list(range(1000, 1400))
EOS = 1


def restore(inputs: list[int], targets: list[int]) -> list[int]:
    """Put each sentinel's span from the targets back into the inputs (an independent inverse)."""
    spans, current = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


def test_t5_published_lengths():
    # T5's span-corruption setting: 512 input tokens need 568-token windows and give 114 target tokens
    assert compute_input_and_target_lengths(512, SpanCorruptionConfig(0.15, 3.0)) == (568, 114)


@settings(max_examples=60, deadline=None)
@given(inputs_length=st.integers(24, 400), density=st.sampled_from([0.1, 0.15, 0.3, 0.5]),
       mean_span=st.sampled_from([1.0, 2.0, 3.0, 5.0]), seed=st.integers(0, 2**31))
def test_corruption_round_trips_with_promised_lengths(inputs_length, density, mean_span, seed):
    config = SpanCorruptionConfig(density, mean_span)
    tokens_length, targets_length = compute_input_and_target_lengths(inputs_length, config)
    rng = np.random.default_rng(seed)
    window = rng.integers(2, 900, size=(2, tokens_length))
    inputs, targets = span_corruption_batch(window, config, SENTINELS, EOS, rng)
    assert inputs.shape[0] == 2 and inputs.shape[1] <= inputs_length
    if density != 0.5:  # (T5 trims one token at density 0.5 to keep targets no longer than inputs)
        assert _lengths(tokens_length + 1, config)[0] > inputs_length  # the longest window that fits
    assert targets.shape == (2, targets_length)
    for row in range(2):
        assert restore(list(inputs[row]), list(targets[row])) == list(window[row])
        assert inputs[row, -1] == EOS and targets[row, -1] == EOS


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 300), seed=st.integers(0, 2**31))
def test_noise_mask_has_the_density_and_alternates_from_kept(length, seed):
    config = SpanCorruptionConfig()
    mask = random_spans_noise_mask(length, config, np.random.default_rng(seed))
    noise = min(max(round(length * 0.15), 1), length - 1)
    assert mask.shape == (length,) and mask.sum() == noise and not mask[0]
    starts = int(np.sum(mask[1:] & ~mask[:-1]))
    assert starts == min(max(round(noise / 3), 1), noise, length - noise)


def test_sentinels_number_spans_in_order():
    mask = np.array([0, 1, 1, 0, 0, 1, 0], dtype=bool)
    inputs, targets = corrupt_spans([10, 11, 12, 13, 14, 15, 16], mask, SENTINELS, EOS)
    assert inputs == [10, 1000, 13, 14, 1001, 16, EOS]
    assert targets == [1000, 11, 12, 1001, 15, EOS]
