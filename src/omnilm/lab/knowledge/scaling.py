"""How the plateau length grows with the number of people N: a power law T = c · N^β.

β and c come from least squares on log T = log c + β log N. Its uncertainty comes from a bootstrap over
training seeds: each resample draws, within every N separately, as many seeds as there are with replacement,
averages them, and refits; the interval is the central ``ci`` fraction of the resampled β.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def fit_power_law(ns: Sequence[float], plateaus: Sequence[float]) -> tuple[float, float]:
    """(β, c) minimising Σ (log T_i − log c − β log N_i)²; needs two distinct N and positive values."""
    if len(ns) != len(plateaus):
        raise ValueError(f"{len(ns)} values of N but {len(plateaus)} plateaus")
    x, y = np.log(_positive(ns, "N")), np.log(_positive(plateaus, "plateau"))
    if len(set(x.tolist())) < 2:
        raise ValueError("need at least two distinct values of N")
    beta, log_c = np.polyfit(x, y, 1)
    return float(beta), math.exp(float(log_c))


def bootstrap_beta(ns: Sequence[float], plateaus_per_seed: Sequence[Sequence[float]], n_boot: int = 1000,
                   seed: int = 0, ci: float = 0.95) -> tuple[float, float, float]:
    """(β, low, high): β fitted to the per-N mean plateau, the interval from resampling seeds within each N.

    ``plateaus_per_seed[i]`` holds one plateau length per seed for ``ns[i]``; seed counts may differ across N.
    """
    if len(ns) != len(plateaus_per_seed):
        raise ValueError(f"{len(ns)} values of N but {len(plateaus_per_seed)} lists of plateaus")
    if not 0 < ci < 1 or n_boot < 1:
        raise ValueError("ci must lie in (0, 1) and n_boot be at least 1")
    groups = [_positive(group, "plateau") for group in plateaus_per_seed]
    if any(len(group) == 0 for group in groups):
        raise ValueError("every N needs at least one seed")
    beta, _ = fit_power_law(ns, [float(group.mean()) for group in groups])
    rng = np.random.default_rng(seed)
    betas = np.empty(n_boot)
    for b in range(n_boot):
        means = [float(rng.choice(group, size=len(group), replace=True).mean()) for group in groups]
        betas[b] = fit_power_law(ns, means)[0]
    low, high = np.quantile(betas, [(1 - ci) / 2, (1 + ci) / 2])
    return beta, float(low), float(high)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n − 1 in the denominator; 0 for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_std of no values")
    data = np.asarray(values, dtype=float)
    spread = float(data.std(ddof=1)) if len(data) > 1 else 0.0
    return float(data.mean()), spread


def _positive(values: Sequence[float], what: str) -> np.ndarray:
    data = np.asarray(values, dtype=float)
    if data.size and not (np.isfinite(data).all() and (data > 0).all()):
        raise ValueError(f"every {what} must be positive and finite for a fit in log space")
    return data
