"""Auto-CoT: the simplicity rule, and the cluster members nearest each centre against a brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilm.prompting import AnswerReader
from omnilm.prompting.auto_cot import AutoCotConfig, clusters_by_distance, count_steps, keep_chain
from omnilm.prompting.exemplars import nearest
from omnilm.utils.kmeans import kmeans

READER = AnswerReader()


def test_steps_are_sentences_besides_the_answer() -> None:
    assert count_steps("3 + 4 = 7. 7 * 2 = 14. The answer is 14.", READER) == 2
    assert count_steps("The answer is 5.", READER) == 0
    assert count_steps("First add.\nThen double!\nThe answer is 6.", READER) == 2


@pytest.mark.parametrize(("chain", "tokens", "kept"), [
    ("1 + 1 = 2. The answer is 2.", 10, True),
    ("1 + 1 = 2. The answer is 2.", 60, True),  # at the token limit
    ("1 + 1 = 2. The answer is 2.", 61, False),  # over it
    ("a. b. c. d. e. The answer is 1.", 20, True),  # five steps
    ("a. b. c. d. e. f. The answer is 1.", 20, False),  # six
    ("1 + 1 = 2.", 5, False),  # no answer stated
])
def test_keep_chain(chain: str, tokens: int, kept: bool) -> None:
    assert keep_chain(chain, tokens, READER, AutoCotConfig()) is kept


def test_cluster_members_sorted_by_distance_to_their_centre() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    x = np.concatenate([c + rng.normal(size=(20, 8)) for c in centres]).astype(np.float32)
    groups = clusters_by_distance(x, 3, seed=1)
    # brute force: the same k-means, then every point's nearest centroid and distance by numpy
    c = kmeans(torch.from_numpy(x), 3, seed=1).centroids.numpy().astype(np.float64)
    d = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    owner = d.argmin(1)
    expected = [sorted(np.flatnonzero(owner == k).tolist(), key=lambda i: (d[i, k], i)) for k in range(3)]
    assert groups == [g for g in expected if g]
    assert sorted(i for g in groups for i in g) == list(range(len(x)))
    assert sorted(len(g) for g in groups) == [20, 20, 20]  # well separated blobs are found


def test_nearest_is_by_cosine_with_stable_ties() -> None:
    keys = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    got = nearest(np.array([[1, 0]], dtype=np.float32), keys, 3)
    assert got.tolist() == [[0, 2, 3]]
    with pytest.raises(ValueError):
        nearest(keys, keys, 5)
