from __future__ import annotations

import math
import random

import pytest

from omnilm.lab.knowledge.baseline import (
    baseline_from_files,
    no_knowledge_loss,
    no_knowledge_loss_from_tokens,
    value_losses,
)


def brute_force(weights: dict[tuple[int, ...], float]) -> float:
    """Enumerate values; for each token position sum the masses of matching values with explicit loops."""
    values = list(weights)
    total_mass = 0.0
    total_loss = 0.0
    for value in values:
        nats = 0.0
        for j in range(len(value)):
            above = 0.0
            here = 0.0
            for other in values:
                if len(other) >= j and all(other[i] == value[i] for i in range(j)):
                    above += weights[other]
                    if len(other) > j and other[j] == value[j]:
                        here += weights[other]
            nats -= math.log(here / above)
        total_loss += weights[value] * nats / len(value)
        total_mass += weights[value]
    return total_loss / total_mass


def test_hand_computed_shared_prefix() -> None:
    weights = {(1, 2): 3.0, (1, 3): 1.0}
    expected = (3 * math.log(4 / 3) / 2 + math.log(4) / 2) / 4
    assert no_knowledge_loss_from_tokens(weights) == pytest.approx(expected, abs=1e-12)


def test_value_that_is_a_prefix_of_another_is_its_own_leaf() -> None:
    weights = {(1,): 1.0, (1, 2): 1.0, (3,): 2.0}
    losses = value_losses(weights)
    assert losses[(1,)] == pytest.approx(math.log(2), abs=1e-12)
    assert losses[(1, 2)] == pytest.approx(math.log(2), abs=1e-12)  # p(1) = 1/2, p(2 | 1) = 1/2
    assert no_knowledge_loss_from_tokens(weights) == pytest.approx(math.log(2), abs=1e-12)


def test_uniform_single_token_values_give_log_count() -> None:
    weights = {(i,): 5.0 for i in range(7)}
    assert no_knowledge_loss_from_tokens(weights) == pytest.approx(math.log(7), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_on_random_prefix_heavy_vocabularies(seed: int) -> None:
    rng = random.Random(seed)
    weights: dict[tuple[int, ...], float] = {}
    while len(weights) < rng.randint(2, 12):
        # A tiny alphabet and short lengths make shared prefixes and prefix-of-another values common.
        weights[tuple(rng.randint(0, 2) for _ in range(rng.randint(1, 4)))] = rng.uniform(0.1, 10.0)
    assert no_knowledge_loss_from_tokens(weights) == pytest.approx(brute_force(weights), rel=1e-12)


def test_string_version_tokenises_each_value() -> None:
    marginal = {"ab": 3.0, "ac": 1.0}
    assert no_knowledge_loss(marginal, lambda v: [ord(c) for c in v]) == pytest.approx(
        no_knowledge_loss_from_tokens({(97, 98): 3.0, (97, 99): 1.0}), abs=1e-15)


def test_values_tokenising_identically_pool_their_mass() -> None:
    assert no_knowledge_loss({"x": 1.0, "X": 1.0, "y": 2.0}, lambda v: [ord(v.lower())]) == pytest.approx(math.log(2))


@pytest.mark.parametrize("weights", [{}, {(): 1.0}, {(1,): -1.0, (2,): 2.0}, {(1,): 0.0}])
def test_rejects_bad_inputs(weights: dict[tuple[int, ...], float]) -> None:
    with pytest.raises(ValueError):
        no_knowledge_loss_from_tokens(weights)


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def record(text: str, value: str, attribute: str) -> dict[str, object]:
    start = text.index(value)
    return {"text": text, "value_start": start, "value_end": start + len(value), "attribute": attribute,
            "person_id": 0, "value": value}


def test_baseline_from_files_uses_eval_value_tokens_and_all_marginal_values() -> None:
    records = [record("Ann was born in Rome.", "Rome", "city"), record("Bo was born in Roma.", "Roma", "city"),
               record("Ann works at Acme.", "Acme", "employer")]
    marginals = {"city": {"Rome": 2.0, "Roma": 1.0, "Oslo": 1.0}, "employer": {"Acme": 4.0}}
    got = baseline_from_files(marginals, records, CharTokenizer())
    # Eval value tokens include the leading space; the unseen "Oslo" is tokenised as " Oslo".
    city = {tuple(map(ord, " Rome")): 2.0, tuple(map(ord, " Roma")): 1.0, tuple(map(ord, " Oslo")): 1.0}
    assert got["city"] == pytest.approx(brute_force(city), rel=1e-12)
    assert got["employer"] == pytest.approx(0.0)
