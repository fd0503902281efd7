"""BART's noising transforms: corrupt a token sequence; the model learns to restore the original.

Each transform is a small frozen dataclass called as ``transform(tokens, rng) -> tokens`` on one document's
body (no BOS/EOS: the caller adds them around the noised and the clean text), so they compose in any order
(``Compose``). The five of the BART paper:

- ``TokenMasking``: each token becomes ``<mask>`` with probability p;
- ``TokenDeletion``: each token is dropped with probability p (the model must find where);
- ``TextInfilling``: spans with Poisson(λ=3) lengths, covering a fraction ``ratio`` of the tokens, each become
  one ``<mask>`` (a 0-length span inserts one); overlapping or adjacent spans merge into one mask;
- ``SentencePermutation``: sentences (ending in one of ``end_ids``) are shuffled;
- ``DocumentRotation``: the document starts at a random token and wraps around.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenMasking:
    mask_id: int
    prob: float = 0.15

    def __call__(self, tokens: Sequence[int], rng: np.random.Generator) -> list[int]:
        hit = rng.random(len(tokens)) < self.prob
        return [self.mask_id if h else int(t) for t, h in zip(tokens, hit, strict=True)]


@dataclass(frozen=True)
class TokenDeletion:
    prob: float = 0.15

    def __call__(self, tokens: Sequence[int], rng: np.random.Generator) -> list[int]:
        keep = rng.random(len(tokens)) >= self.prob
        return [int(t) for t, k in zip(tokens, keep, strict=True) if k]


@dataclass(frozen=True)
class TextInfilling:
    mask_id: int
    #: Fraction of the tokens covered by masked spans (BART: 0.3).
    ratio: float = 0.3
    #: Mean span length (Poisson λ).
    poisson_lambda: float = 3.0

    def span_lengths(self, n: int, rng: np.random.Generator) -> list[int]:
        """Poisson lengths until they cover round(ratio · n) tokens, the last one trimmed to fit."""
        target = int(round(n * self.ratio))
        lengths: list[int] = []
        covered = 0
        while covered < target:
            length = int(rng.poisson(self.poisson_lambda))
            length = min(length, target - covered)
            lengths.append(length)
            covered += length
            if len(lengths) > 4 * n + 16:  # λ → 0 draws only empty spans; stop inserting masks
                break
        return lengths

    def __call__(self, tokens: Sequence[int], rng: np.random.Generator) -> list[int]:
        n = len(tokens)
        if n == 0:
            return []
        lengths = self.span_lengths(n, rng)
        starts = rng.integers(0, n, size=len(lengths))
        covered = np.zeros(n, dtype=bool)
        insert_before = np.zeros(n, dtype=bool)
        for start, length in zip(starts, lengths, strict=True):
            if length == 0:
                insert_before[start] = True
            else:
                covered[start:start + length] = True
        out: list[int] = []
        for i, token in enumerate(tokens):
            after_span = i > 0 and covered[i - 1]
            if covered[i]:
                if not after_span:  # one mask for a whole run of covered tokens
                    out.append(self.mask_id)
                continue
            if insert_before[i] and not after_span:
                out.append(self.mask_id)
            out.append(int(token))
        return out


@dataclass(frozen=True)
class SentencePermutation:
    #: Token ids that end a sentence (e.g. the ids of ".", "!", "?").
    end_ids: tuple[int, ...]

    def __call__(self, tokens: Sequence[int], rng: np.random.Generator) -> list[int]:
        sentences: list[list[int]] = [[]]
        for token in tokens:
            sentences[-1].append(int(token))
            if token in self.end_ids:
                sentences.append([])
        sentences = [s for s in sentences if s]
        order = rng.permutation(len(sentences))
        return [t for i in order for t in sentences[i]]


@dataclass(frozen=True)
class DocumentRotation:
    def __call__(self, tokens: Sequence[int], rng: np.random.Generator) -> list[int]:
        if len(tokens) == 0:
            return []
        start = int(rng.integers(0, len(tokens)))
        return [int(t) for t in list(tokens[start:]) + list(tokens[:start])]


@dataclass(frozen=True)
class Compose:
    """Apply ``transforms`` in order."""

    transforms: tuple

    def __call__(self, tokens: Sequence[int], rng: np.random.Generator) -> list[int]:
        out = [int(t) for t in tokens]
        for transform in self.transforms:
            out = transform(out, rng)
        return out


def bart_noising(mask_id: int, end_ids: Sequence[int], options: dict | None = None) -> Compose:
    """The BART-large recipe as a ``Compose``: sentence permutation, then text infilling (30 %, λ = 3);
    ``options`` switch steps on/off or set their rates: ``permute_sentences``, ``rotate``, ``infill_ratio``,
    ``poisson_lambda``, ``mask_prob``, ``delete_prob``."""
    o = {"permute_sentences": True, "rotate": False, "infill_ratio": 0.3, "poisson_lambda": 3.0,
         "mask_prob": 0.0, "delete_prob": 0.0} | dict(options or {})
    steps: list = []
    if o["permute_sentences"] and end_ids:
        steps.append(SentencePermutation(tuple(end_ids)))
    if o["rotate"]:
        steps.append(DocumentRotation())
    if o["mask_prob"] > 0:
        steps.append(TokenMasking(mask_id, o["mask_prob"]))
    if o["delete_prob"] > 0:
        steps.append(TokenDeletion(o["delete_prob"]))
    if o["infill_ratio"] > 0:
        steps.append(TextInfilling(mask_id, o["infill_ratio"], o["poisson_lambda"]))
    return Compose(tuple(steps))
