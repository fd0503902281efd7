"""Auto-CoT (Zhang et al., 2023): demonstrations the model writes itself, for questions that cover the data.

Embed the questions (the model's own mean-pooled hidden states), cluster them with k-means, and for each cluster
try its questions nearest the centre first: the model answers each with the zero-shot chain-of-thought trigger
(greedy), and the first chain that is short enough becomes that cluster's demonstration. "Short enough" is the
paper's simplicity rule: at most ``max_tokens`` tokens and ``max_steps`` reasoning steps; a chain must also state
an answer (one that does not shows the model nothing to imitate). Chains are not checked for correctness: Auto-CoT
works without labels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from omnilm.infer.sampling import SamplingParams
from omnilm.prompting.answers import AnswerReader
from omnilm.prompting.prompts import COT_TRIGGER, Demonstration, chat_messages
from omnilm.prompting.responder import Responder
from omnilm.utils.kmeans import assign, kmeans

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class AutoCotConfig:
    clusters: int = 4  # demonstrations wanted: one per k-means cluster of the questions
    candidates: int = 4  # questions tried per cluster (nearest the centre first) before the cluster gives none
    max_tokens: int = 60  # a kept chain has at most this many tokens
    max_steps: int = 5  # and at most this many reasoning steps (sentences besides the one stating the answer)
    max_new_tokens: int = 96  # generation budget of a chain (above max_tokens, so that long chains are seen as such)
    seed: int = 0  # k-means seed


def count_steps(chain: str, reader: AnswerReader) -> int:
    """Reasoning steps of a chain: its sentences (or lines), not counting those that state the answer."""
    sentences = [s for s in SENTENCE_END.split(chain.strip()) if s.strip()]
    return sum(1 for s in sentences if reader(s) is None)


def keep_chain(chain: str, n_tokens: int, reader: AnswerReader, config: AutoCotConfig) -> bool:
    """The simplicity rule: an answer stated, ≤ ``max_tokens`` tokens, ≤ ``max_steps`` steps."""
    return (reader(chain) is not None and n_tokens <= config.max_tokens
            and count_steps(chain, reader) <= config.max_steps)


def clusters_by_distance(vectors: np.ndarray, k: int, seed: int = 0) -> list[list[int]]:
    """k-means of the rows of ``vectors``; per cluster (in centroid order) its members' indices, nearest the centre
    first (equal distances: lower index first). Clusters left empty are omitted."""
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    centroids = kmeans(x, k, seed=seed).centroids
    codes, distances = assign(x, centroids)
    codes, distances = codes.numpy(), distances.numpy()
    groups = []
    for c in range(centroids.shape[0]):
        members = np.flatnonzero(codes == c)
        if len(members):
            groups.append(members[np.argsort(distances[members], kind="stable")].tolist())
    return groups


def demonstrations(responder: Responder, questions: Sequence[str], vectors: np.ndarray,
                   config: AutoCotConfig | None = None, reader: AnswerReader | None = None,
                   trigger: str = COT_TRIGGER) -> list[Demonstration]:
    """One demonstration per cluster that has a short enough chain among its first ``candidates`` questions (all
    candidates' chains are generated in one greedy batch)."""
    config = config or AutoCotConfig()
    reader = reader or AnswerReader()
    groups = [g[:config.candidates] for g in clusters_by_distance(vectors, config.clusters, config.seed)]
    tried = [i for g in groups for i in g]
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0)
    chains = dict(zip(tried, responder.replies([chat_messages(questions[i], trigger=trigger) for i in tried],
                                               params), strict=True))
    demos = []
    for group in groups:
        for i in group:
            n_tokens = len(responder.tokenizer.encode(chains[i], special=False))
            if keep_chain(chains[i], n_tokens, reader, config):
                demos.append(Demonstration(questions[i], chains[i]))
                break
    return demos
