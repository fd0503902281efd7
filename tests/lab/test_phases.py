from __future__ import annotations

import math
import random

import pytest

from omnilm.lab.knowledge.phases import Phases, detect_phases

BASELINE = 3.0


def curve(steps: list[int], drop_tau: float, plateau_end: int, noise: float, seed: int = 0) -> list[float]:
    """Exponential drop from 10 to the baseline, a noisy plateau, then a second exponential drop to 0.5."""
    rng = random.Random(seed)
    out = []
    for s in steps:
        loss = BASELINE + 7.0 * math.exp(-s / drop_tau)
        if s >= plateau_end:
            loss -= (BASELINE - 0.5) * (1 - math.exp(-(s - plateau_end) / 50))
        out.append(loss + rng.uniform(-noise, noise))
    return out


def test_piecewise_curve_with_noisy_plateau() -> None:
    steps = list(range(0, 2000, 10))
    losses = curve(steps, drop_tau=40, plateau_end=1000, noise=0.05)
    # With noise in ±0.05, loss <= B + 0.1 needs 7 e^{-s/40} <= 0.15 (s >= 40 ln(7 / 0.15) ≈ 154) and is
    # certain once 7 e^{-s/40} <= 0.05 (s >= 40 ln 140 ≈ 198).
    phases = detect_phases(steps, losses, BASELINE, eps=0.1, delta=0.2)
    assert phases.drop_end is not None and 40 * math.log(70 / 1.5) <= phases.drop_end <= 200
    # At 1010 the second drop has taken 2.5 (1 − e^{-1/5}) ≈ 0.45 off, past delta + noise; at 1000 nothing.
    assert phases.emergence_step == 1010
    assert phases.plateau_length == 1010 - phases.drop_end
    assert phases.plateau_start == phases.drop_end and phases.plateau_end == phases.emergence_step


def test_exact_steps_on_a_hand_made_curve() -> None:
    steps = [0, 100, 200, 300, 400, 500, 600, 700]
    losses = [9.0, 5.0, 3.05, 2.98, 3.02, 2.7, 2.2, 1.0]
    assert detect_phases(steps, losses, BASELINE, eps=0.1, delta=0.25) == Phases(200, 500, 300)
    assert detect_phases(steps, losses, BASELINE, eps=0.01, delta=0.25) == Phases(300, 500, 200)


def test_patience_ignores_a_single_noisy_dip() -> None:
    steps = list(range(10))
    losses = [8.0, 3.0, 3.0, 2.5, 3.0, 3.0, 2.5, 2.4, 2.3, 2.2]
    assert detect_phases(steps, losses, BASELINE, eps=0.1, delta=0.3).emergence_step == 3
    assert detect_phases(steps, losses, BASELINE, eps=0.1, delta=0.3, patience=3) == Phases(1, 6, 5)
    # Fewer evaluations left than the patience window: not yet emergence.
    assert detect_phases(steps, losses, BASELINE, eps=0.1, delta=0.3, patience=5) == Phases(1, None, None)


def test_emergence_must_come_after_the_drop() -> None:
    # The first evaluation already sits below B − delta: it ends the drop, and emergence needs a later one.
    assert detect_phases([0, 1, 2], [2.0, 3.0, 2.0], BASELINE, eps=0.1, delta=0.5) == Phases(0, 2, 2)


def test_never_reaching_the_baseline() -> None:
    steps = list(range(0, 500, 10))
    losses = [BASELINE + 1.0 + 5 * math.exp(-s / 30) for s in steps]
    assert detect_phases(steps, losses, BASELINE, eps=0.1, delta=0.2) == Phases(None, None, None)


def test_never_emerging() -> None:
    steps = list(range(0, 2000, 10))
    losses = curve(steps, drop_tau=40, plateau_end=10**9, noise=0.05, seed=3)
    phases = detect_phases(steps, losses, BASELINE, eps=0.1, delta=0.2)
    assert phases.drop_end is not None and phases.emergence_step is None and phases.plateau_length is None


@pytest.mark.parametrize(("steps", "losses", "kwargs"), [
    ([0, 1], [1.0], {}), ([0, 0], [1.0, 1.0], {}), ([0, 1], [1.0, 1.0], {"patience": 0}),
    ([0, 1], [1.0, 1.0], {"eps": -1.0}),
])
def test_rejects_bad_inputs(steps: list[int], losses: list[float], kwargs: dict[str, float]) -> None:
    args = {"baseline": BASELINE, "eps": 0.1, "delta": 0.1, **kwargs}
    with pytest.raises(ValueError):
        detect_phases(steps, losses, **args)
