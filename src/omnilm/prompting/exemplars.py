"""Exemplar sets for few-shot prompts: a chosen list, or per question the most similar training questions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omnilm.prompting.prompts import Demonstration


def chosen(pool: Sequence[Demonstration], indices: Sequence[int]) -> list[Demonstration]:
    """The demonstrations at ``indices`` of ``pool``, in that order (the same set for every question)."""
    bad = [i for i in indices if not 0 <= i < len(pool)]
    if bad:
        raise ValueError(f"exemplar indices {bad} outside the pool of {len(pool)}")
    return [pool[i] for i in indices]


def nearest(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Indices (Q, k) of the ``k`` rows of ``keys`` (N, D) most similar to each row of ``queries`` (Q, D), by dot
    product (cosine for L2-normalised vectors), most similar first; equal scores keep the lower index first."""
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k={k}: need 1 <= k <= {keys.shape[0]} (the pool)")
    scores = queries @ keys.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def retrieved(query_vectors: np.ndarray, pool_vectors: np.ndarray, pool: Sequence[Demonstration],
              k: int) -> list[list[Demonstration]]:
    """Per query, the ``k`` pool demonstrations whose questions are most similar, the most similar *last* (nearest
    the question, where a small model attends most)."""
    return [[pool[i] for i in row[::-1]] for row in nearest(query_vectors, pool_vectors, k)]
