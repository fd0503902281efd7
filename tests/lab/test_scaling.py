from __future__ import annotations

import math

import numpy as np
import pytest

from omnilm.lab.knowledge.scaling import bootstrap_beta, fit_power_law, mean_std

NS = [1000, 2000, 4000, 8000, 16000]


def test_exact_power_law_is_recovered() -> None:
    beta, coefficient = fit_power_law(NS, [3.5 * n**0.8 for n in NS])
    assert beta == pytest.approx(0.8, abs=1e-9)
    assert coefficient == pytest.approx(3.5, rel=1e-9)


def test_fit_matches_closed_form_least_squares() -> None:
    ns, plateaus = [10, 20, 40], [100.0, 300.0, 500.0]
    x, y = [math.log(n) for n in ns], [math.log(p) for p in plateaus]
    mx, my = sum(x) / 3, sum(y) / 3
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)
    beta, coefficient = fit_power_law(ns, plateaus)
    assert beta == pytest.approx(slope, abs=1e-12)
    assert coefficient == pytest.approx(math.exp(my - slope * mx), rel=1e-12)


def test_bootstrap_of_noiseless_seeds_is_a_point() -> None:
    beta, low, high = bootstrap_beta(NS, [[2.0 * n**1.2] * 3 for n in NS], n_boot=50)
    assert beta == pytest.approx(1.2, abs=1e-9)
    assert low == pytest.approx(1.2, abs=1e-9) and high == pytest.approx(1.2, abs=1e-9)


def noisy(seed: int, seeds: int = 5, sigma: float = 0.2) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return [list(7.0 * n**0.7 * np.exp(rng.normal(0.0, sigma, size=seeds))) for n in NS]


@pytest.mark.parametrize("data_seed", range(5))
def test_interval_contains_the_true_exponent_under_lognormal_noise(data_seed: int) -> None:
    beta, low, high = bootstrap_beta(NS, noisy(data_seed), n_boot=500, seed=1)
    assert low <= 0.7 <= high
    assert low <= beta <= high and high - low < 0.3


def test_bootstrap_is_reproducible_for_a_seed_and_varies_across_seeds() -> None:
    data = noisy(11)
    assert bootstrap_beta(NS, data, n_boot=200, seed=4) == bootstrap_beta(NS, data, n_boot=200, seed=4)
    assert bootstrap_beta(NS, data, n_boot=200, seed=4)[1:] != bootstrap_beta(NS, data, n_boot=200, seed=5)[1:]


def test_seed_counts_may_differ_across_n() -> None:
    data = [[2.0 * n**0.5] * k for n, k in zip(NS, [1, 2, 3, 4, 5], strict=True)]
    beta, low, high = bootstrap_beta(NS, data, n_boot=20)
    assert beta == pytest.approx(0.5, abs=1e-9) and low == pytest.approx(0.5, abs=1e-9)


def test_mean_std() -> None:
    assert mean_std([2.0, 4.0, 6.0]) == pytest.approx((4.0, 2.0))
    assert mean_std([5.0]) == (5.0, 0.0)


@pytest.mark.parametrize(("ns", "plateaus"), [([1, 2], [1.0]), ([1, 1], [1.0, 2.0]), ([1, 2], [0.0, 1.0]),
                                              ([1, 2], [1.0, math.nan])])
def test_fit_rejects_bad_inputs(ns: list[float], plateaus: list[float]) -> None:
    with pytest.raises(ValueError):
        fit_power_law(ns, plateaus)


@pytest.mark.parametrize(("data", "kwargs"), [([[1.0], []], {}), ([[1.0], [2.0]], {"ci": 1.0}),
                                              ([[1.0], [2.0]], {"n_boot": 0}), ([[1.0]], {})])
def test_bootstrap_rejects_bad_inputs(data: list[list[float]], kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        bootstrap_beta([1, 2], data, **kwargs)


def test_mean_std_rejects_no_values() -> None:
    with pytest.raises(ValueError):
        mean_std([])


def test_study_fit_uses_only_n_with_a_plateau_in_every_seed() -> None:
    from omnilm.lab.knowledge.plateau_scaling import fit_phase

    def run(people: int, lengths: list[int | None]) -> dict:
        return {"people": people, "phases": [{"plateau_length": length} for length in lengths]}

    per_n = [run(100, [40, 44]), run(200, [70, 80]), run(400, [130, None]), run(800, [240, 250])]
    fit = fit_phase(per_n, "plateau_length")
    assert fit["excluded_n"] == [400]
    expected, _ = fit_power_law([100, 200, 800], [42, 75, 245])
    assert fit["beta"] == pytest.approx(expected, abs=1e-12) and fit["low"] <= fit["beta"] <= fit["high"]
    assert fit_phase([run(100, [None]), run(200, [50])], "plateau_length")["beta"] is None
