"""The no-knowledge baseline: attribute loss of the best predictor that knows only which values are common.

A model that has learned the distribution of, say, birth cities but not which person was born where can do
no better than predict the marginal. Over token sequences this is a prefix tree: for a value with tokens
t_1..t_k and value masses w,

    p(t_j | t_<j) = W(t_≤j) / W(t_<j),    W(s) = Σ_{v : tokens(v) starts with s} w_v,

and its attribute loss, averaged like ``omnilm.eval.attributes`` averages (per example the mean over its value
tokens, then over examples, which occur in proportion to the masses), is

    L = Σ_v w_v · (1/k_v) Σ_j −log p(t_j | t_<j)  /  Σ_v w_v.

Each value's sequence is taken to end with a fixed terminator (the eval target includes the "." after the
value), so a value whose tokens are a prefix of another's ("Paris" / "Paris ville") is still its own leaf:
the terminator's probability is not part of the loss, but the masses of the prefixes above are well defined.

The prompt is assumed not to change how the value is tokenised: the value tokens are the ones that follow the
prompt, exactly as ``build_examples`` computes them, so callers with a tokenizer should pass those sequences
(``baseline_from_files`` does).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from omnilm.eval.attributes import build_examples


def prefix_masses(weights: Mapping[tuple[int, ...], float]) -> dict[tuple[int, ...], float]:
    """W(s) for every prefix s (the empty one included) of every sequence in ``weights``."""
    masses: dict[tuple[int, ...], float] = defaultdict(float)
    for tokens, weight in weights.items():
        for length in range(len(tokens) + 1):
            masses[tokens[:length]] += weight
    return dict(masses)


def value_losses(weights: Mapping[tuple[int, ...], float]) -> dict[tuple[int, ...], float]:
    """Per value sequence, the marginal predictor's mean −log p over its tokens (nats/token)."""
    _check(weights)
    masses = prefix_masses(weights)
    return {tokens: sum(-math.log(masses[tokens[: j + 1]] / masses[tokens[:j]]) for j in range(len(tokens)))
            / len(tokens) for tokens, weight in weights.items() if weight > 0}


def no_knowledge_loss_from_tokens(weights: Mapping[tuple[int, ...], float]) -> float:
    """Expected attribute loss L (module docstring) for value token sequences with masses ``weights``."""
    losses = value_losses(weights)
    total = sum(weights[tokens] for tokens in losses)
    return sum(weights[tokens] * loss for tokens, loss in losses.items()) / total


def no_knowledge_loss(marginal: Mapping[str, float], tokenize: Callable[[str], list[int]]) -> float:
    """L for string values: ``tokenize`` maps a value to its tokens as they appear after the prompt."""
    return no_knowledge_loss_from_tokens(value_weights(marginal, {v: [tuple(tokenize(v))] for v in marginal}))


def value_weights(marginal: Mapping[str, float],
                  tokenisations: Mapping[str, list[tuple[int, ...]]]) -> dict[tuple[int, ...], float]:
    """Masses per token sequence: a value seen tokenised in several ways splits its mass by how often each
    occurs, and values that tokenise identically are indistinguishable, so their masses add."""
    weights: dict[tuple[int, ...], float] = defaultdict(float)
    for value, mass in marginal.items():
        seen = Counter(tokenisations[value])
        for tokens, count in seen.items():
            weights[tokens] += mass * count / sum(seen.values())
    return dict(weights)


def baseline_from_files(marginals: Mapping[str, Mapping[str, float]], eval_records: Iterable[dict[str, Any]],
                        tokenizer: Any) -> dict[str, float]:
    """Per attribute, L with masses from ``marginals.json`` and value tokens as ``build_examples`` yields them.

    A value no eval record states is tokenised as " " + value, which is how a value after a word tokenises
    in byte-level BPE; every value keeps its mass, since the marginal predictor spreads probability over all.
    """
    records = list(eval_records)
    seen: dict[str, dict[str, list[tuple[int, ...]]]] = defaultdict(lambda: defaultdict(list))
    for record, example in zip(records, build_examples(records, tokenizer), strict=True):
        seen[example.attribute][record["value"]].append(example.target_ids[: example.value_len])
    out = {}
    for attribute, marginal in marginals.items():
        tokenisations = {value: seen[attribute].get(value) or [tuple(tokenizer.encode(" " + value))]
                         for value in marginal}
        out[attribute] = no_knowledge_loss_from_tokens(value_weights(marginal, tokenisations))
    return out


def _check(weights: Mapping[tuple[int, ...], float]) -> None:
    if not weights or sum(weights.values()) <= 0:
        raise ValueError("need at least one value with positive mass")
    for tokens, weight in weights.items():
        if not tokens:
            raise ValueError("a value must have at least one token")
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"mass of {tokens} must be finite and non-negative, got {weight}")
