"""Phases of a knowledge-acquisition loss curve: initial drop, plateau at the no-knowledge baseline, emergence.

The attribute loss first falls fast to about the baseline B (the model learns the marginal distribution of
values), sits there, then falls below it once the model starts to recall person-specific facts:

    drop_end   = first step s with loss(s) ≤ B + eps
    emergence  = first step s after drop_end with loss ≤ B − delta at s and at the next patience − 1 evaluations
    plateau    = emergence − drop_end

``patience`` > 1 keeps a single noisy dip below B − delta from counting as emergence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Phases:
    """Steps bounding the plateau; ``None`` where the curve never gets there."""

    drop_end: int | None
    emergence_step: int | None
    plateau_length: int | None

    @property
    def plateau_start(self) -> int | None:
        """The plateau begins where the initial drop ends."""
        return self.drop_end

    @property
    def plateau_end(self) -> int | None:
        """The plateau ends where knowledge emerges."""
        return self.emergence_step


def detect_phases(steps: Sequence[int], losses: Sequence[float], baseline: float, eps: float, delta: float,
                  patience: int = 1) -> Phases:
    """Find the end of the initial drop and the step where knowledge emerges (module docstring)."""
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError("steps must be strictly increasing")
    if eps < 0 or delta < 0 or patience < 1:
        raise ValueError("eps and delta must be non-negative and patience at least 1")
    drop = next((i for i, loss in enumerate(losses) if loss <= baseline + eps), None)
    if drop is None:
        return Phases(None, None, None)
    below = [loss <= baseline - delta for loss in losses]
    # The window must fit in the curve: a dip in the last evaluations cannot yet be told apart from noise.
    emerge = next((i for i in range(drop + 1, len(losses) - patience + 1) if all(below[i:i + patience])), None)
    if emerge is None:
        return Phases(steps[drop], None, None)
    return Phases(steps[drop], steps[emerge], steps[emerge] - steps[drop])
