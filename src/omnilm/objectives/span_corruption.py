"""T5's span corruption: drop random spans of a token window, mark each by a sentinel, predict the spans.

For a window of ``tokens_length`` tokens: ``round(length · noise_density)`` noise tokens (at least 1, at most
length − 1) form ``round(noise / mean_span)`` spans (at least 1); the noise and the non-noise tokens are each
cut into that many non-empty pieces at random and interleaved, non-noise first. Then

  inputs  = nonnoise₁ ⟨s₀⟩ nonnoise₂ ⟨s₁⟩ … nonnoiseₙ ⟨sₙ₋₁⟩ EOS
  targets = ⟨s₀⟩ noise₁ ⟨s₁⟩ noise₂ … ⟨sₙ₋₁⟩ noiseₙ EOS

so an input of ``inputs_length`` tokens needs a window of the length ``compute_input_and_target_lengths``
returns (T5's ``random_spans_helper``): the longest window whose corrupted input still fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpanCorruptionConfig:
    """T5's defaults."""

    #: Fraction of the window's tokens that are dropped into the targets.
    noise_density: float = 0.15
    #: Mean length of a dropped span.
    mean_noise_span_length: float = 3.0

    def __post_init__(self) -> None:
        if not 0 < self.noise_density < 1 or self.mean_noise_span_length < 1:
            raise ValueError(f"invalid span corruption settings {self}")


def _noise_and_spans(length: int, config: SpanCorruptionConfig) -> tuple[int, int]:
    """Dropped tokens and noise spans in a window of ``length``: at least one of each, and a kept span per noise
    span (the lengths computed for a window and the mask drawn for it must agree)."""
    noise = min(max(int(round(length * config.noise_density)), 1), length - 1)
    spans = max(int(round(noise / config.mean_noise_span_length)), 1)
    return noise, min(spans, noise, length - noise)


def _lengths(tokens_length: int, config: SpanCorruptionConfig) -> tuple[int, int]:
    noise, spans = _noise_and_spans(tokens_length, config)
    # inputs: the kept tokens, a sentinel per span, EOS; targets: the dropped tokens, a sentinel per span, EOS
    return tokens_length - noise + spans + 1, noise + spans + 1


def compute_input_and_target_lengths(inputs_length: int, config: SpanCorruptionConfig = SpanCorruptionConfig(),
                                     ) -> tuple[int, int]:
    """(tokens_length, targets_length): the longest raw window whose corrupted inputs are at most
    ``inputs_length`` tokens long (EOS included), and the resulting targets' length."""
    tokens_length = inputs_length
    while _lengths(tokens_length + 1, config)[0] <= inputs_length:
        tokens_length += 1
    # Not in T5's helper: with spans so short that sentinels and EOS outnumber the dropped tokens, even a window
    # of inputs_length overflows; shrink it then.
    while tokens_length > 2 and _lengths(tokens_length, config)[0] > inputs_length:
        tokens_length -= 1
    _, targets_length = _lengths(tokens_length, config)
    # T5's adjustment: at density 0.5 keep the targets no longer than the inputs
    # (T5 then takes targets_length − 1 as it stands; the targets of the shorter window are recounted here, so the
    # promised length is the length every corrupted row has)
    if config.noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        _, targets_length = _lengths(tokens_length, config)
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of ``num_segments`` non-empty pieces that ``num_items`` items are cut into at random."""
    cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, config: SpanCorruptionConfig, rng: np.random.Generator) -> np.ndarray:
    """Boolean (length,) noise mask: alternating kept / dropped spans, starting with a kept one."""
    noise, spans = _noise_and_spans(length, config)
    noise_lengths = _random_segmentation(noise, spans, rng)
    kept_lengths = _random_segmentation(length - noise, spans, rng)
    pieces = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)  # kept₁, noise₁, kept₂, noise₂, …
    flags = np.tile([False, True], spans)
    return np.repeat(flags, pieces)


def corrupt_spans(tokens: Sequence[int], noise_mask: np.ndarray, sentinel_ids: Sequence[int],
                  eos_id: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of ``tokens`` for a noise mask: each dropped span becomes the next sentinel in the
    inputs, and the targets list each sentinel followed by the span it stands for; both end with EOS."""
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, token in enumerate(tokens):
        if noise_mask[i]:
            if i == 0 or not noise_mask[i - 1]:
                span += 1
                if span >= len(sentinel_ids):
                    raise ValueError(f"{span + 1} spans need more than the {len(sentinel_ids)} sentinel tokens")
                inputs.append(sentinel_ids[span])
                targets.append(sentinel_ids[span])
            targets.append(int(token))
        else:
            inputs.append(int(token))
    return inputs + [eos_id], targets + [eos_id]


def span_corruption_batch(windows: np.ndarray, config: SpanCorruptionConfig, sentinel_ids: Sequence[int],
                          eos_id: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt each row of ``windows`` (B, tokens_length): inputs (B, inputs_length) and targets
    (B, targets_length), each row exactly as long as ``compute_input_and_target_lengths`` promises."""
    pairs = [corrupt_spans(row, random_spans_noise_mask(len(row), config, rng), sentinel_ids, eos_id)
             for row in windows]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
