"""Fitting scaling laws to training runs.

- ``fit_chinchilla``: Chinchilla's approach 3. With a = log A, b = log B, e = log E, minimise
  Σ_i Huber_δ(LSE(a − α·log N_i, b − β·log D_i, e) − log L_i), δ = 1e-3, by L-BFGS (scipy) from the best
  starts of Chinchilla's initialisation grid (α, β ∈ {0, .5, …, 2}, e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25}).
  The grid is scored in one vectorised pass and only the ``starts`` lowest points are optimised.
- ``bootstrap_chinchilla``: the same fit on runs resampled with replacement; percentile intervals.
- ``isoflop_minima`` / ``fit_isoflop``: approach 2. Per compute budget a parabola of L in log N gives the
  loss-minimising size; a power law through those minima gives N_opt ∝ C^a (and D_opt = C/(6·N_opt)).
- ``fit_power_law``: Kaplan's L(x) = (x_c/x)^k through the lower envelope of the runs in x.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from omnilm.errors import UserError
from omnilm.scaling.laws import ChinchillaLaw, PowerLaw

HUBER_DELTA = 1e-3
EXPONENT_FLOOR = 1e-4
ALPHA_GRID = BETA_GRID = np.arange(0.0, 2.01, 0.5)
E_GRID = np.arange(-1.0, 1.01, 0.5)
A_GRID = B_GRID = np.arange(0.0, 25.01, 5.0)


def _check_runs(n: np.ndarray, d: np.ndarray, loss: np.ndarray, minimum: int) -> None:
    if not (len(n) == len(d) == len(loss)):
        raise UserError("N, D and loss need the same number of runs")
    if len(n) < minimum:
        raise UserError(f"at least {minimum} runs are needed for this fit, got {len(n)}")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any() or not np.isfinite(loss).all():
        raise UserError("N, D and loss must be positive and finite for every run")


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber loss of the log-residuals and its gradient in θ = (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, runs)
    r = logsumexp(terms, axis=0) - log_l
    small = np.abs(r) <= delta
    huber = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    psi = np.where(small, r, delta * np.sign(r))  # dHuber/dr
    w = softmax(terms, axis=0)  # dLSE/dterm
    grad = np.array([(psi * w[0]).sum(), (psi * w[1]).sum(), (psi * w[2]).sum(),
                     -(psi * w[0] * log_n).sum(), -(psi * w[1] * log_d).sum()]) / len(r)
    return float(huber.mean()), grad


def _grid_objective(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> tuple[np.ndarray, ...]:
    """Every initialisation of the grid (K, 5) and its objective (K,), computed in one pass."""
    grid = np.array(list(itertools.product(A_GRID, B_GRID, E_GRID, ALPHA_GRID, BETA_GRID)))
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    r = np.abs(logsumexp(terms, axis=0) - log_l)
    values = np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).mean(axis=1)
    return grid, values


@dataclass(frozen=True)
class ChinchillaFit:
    """An approach-3 fit: the law and the Huber objective it reached."""

    law: ChinchillaLaw
    objective: float
    n_runs: int


def _minimise(start: np.ndarray, args: tuple) -> tuple[np.ndarray, float]:
    # Exponents stay positive (a law whose loss grows with N or D has no compute-optimal allocation).
    bounds = [(None, None)] * 3 + [(EXPONENT_FLOOR, None)] * 2
    start = np.maximum(start, [-np.inf] * 3 + [EXPONENT_FLOOR] * 2)
    result = minimize(_objective, start, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
    return result.x, float(result.fun)


def fit_chinchilla(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = HUBER_DELTA,
                   starts: int = 16, extra_starts: list[np.ndarray] | None = None) -> ChinchillaFit:
    """Fit L = E + A/N^α + B/D^β to runs (N parameters, D tokens, final loss) as Chinchilla's approach 3.

    L-BFGS runs from the ``starts`` best points of the initialisation grid (and from ``extra_starts``,
    θ = (log A, log B, log E, α, β) vectors); the lowest objective wins.
    """
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    _check_runs(n, d, loss, minimum=5)
    args = (np.log(n), np.log(d), np.log(loss), delta)
    candidates = []
    if starts > 0:
        grid, values = _grid_objective(*args)
        candidates = list(grid[np.argsort(values)[:starts]])
    candidates += list(extra_starts or [])
    if not candidates:
        raise UserError("fit_chinchilla needs at least one start")
    best_theta, best_value = None, np.inf
    for start in candidates:
        theta, value = _minimise(np.asarray(start, dtype=np.float64), args)
        if value < best_value:
            best_theta, best_value = theta, value
    a, b, e, alpha, beta = best_theta
    law = ChinchillaLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                        beta=float(beta))
    return ChinchillaFit(law, best_value, len(n))


def law_to_theta(law: ChinchillaLaw) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def bootstrap_chinchilla(n: np.ndarray, d: np.ndarray, loss: np.ndarray, samples: int = 100, seed: int = 0,
                         point: ChinchillaFit | None = None, starts: int = 2) -> list[ChinchillaLaw]:
    """Approach-3 fits on ``samples`` resamplings of the runs (with replacement).

    Each refit starts from the full-data fit ``point`` plus the ``starts`` best grid points, which keeps a
    bootstrap of a few hundred samples within seconds.
    """
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    point = point or fit_chinchilla(n, d, loss)
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(samples):
        index = rng.integers(0, len(n), len(n))
        if len(np.unique(index)) < 5:
            continue
        fit = fit_chinchilla(n[index], d[index], loss[index], starts=starts, extra_starts=[law_to_theta(point.law)])
        laws.append(fit.law)
    return laws


def percentile_interval(values: list[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values``."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------- approach 2


@dataclass(frozen=True)
class IsoFlopMinimum:
    """The loss-minimising size of one compute budget, from a parabola in log N."""

    flops: float
    n_opt: float
    loss_opt: float
    #: Whether the minimum falls inside the sampled sizes (an extrapolated one is less trustworthy).
    inside: bool


def isoflop_minima(n: np.ndarray, loss: np.ndarray, flops: np.ndarray) -> list[IsoFlopMinimum]:
    """For each distinct budget with at least three sizes, the vertex of L = c₀ + c₁·log N + c₂·(log N)².

    Budgets whose parabola opens downwards (no minimum) are skipped.
    """
    n, loss, flops = (np.asarray(x, dtype=np.float64) for x in (n, loss, flops))
    minima = []
    for budget in np.unique(flops):
        sel = flops == budget
        if sel.sum() < 3:
            continue
        x = np.log(n[sel])
        c2, c1, c0 = np.polyfit(x, loss[sel], 2)
        if c2 <= 0:
            continue
        x_opt = -c1 / (2 * c2)
        minima.append(IsoFlopMinimum(float(budget), float(np.exp(x_opt)), float(c0 + c1 * x_opt + c2 * x_opt**2),
                                     bool(x.min() <= x_opt <= x.max())))
    return minima


@dataclass(frozen=True)
class IsoFlopFit:
    """N_opt = k·C^a (approach 2); D_opt = C/(6·N_opt) ∝ C^(1−a)."""

    k: float
    a: float
    minima: tuple[IsoFlopMinimum, ...]

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        n = self.k * flops ** self.a
        return n, flops / (6 * n)


def fit_isoflop(n: np.ndarray, loss: np.ndarray, flops: np.ndarray) -> IsoFlopFit:
    """Approach 2: a least-squares line log N_opt = a·log C + log k through the per-budget minima."""
    minima = isoflop_minima(n, loss, flops)
    if len(minima) < 2:
        raise UserError(f"the IsoFLOP method needs at least two budgets with three or more sizes each and a "
                        f"minimum; got {len(minima)}")
    log_c = np.log([m.flops for m in minima])
    log_n = np.log([m.n_opt for m in minima])
    a, log_k = np.polyfit(log_c, log_n, 1)
    return IsoFlopFit(float(np.exp(log_k)), float(a), tuple(minima))


# ---------------------------------------------------------------------------------------------- Kaplan


def lower_envelope(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs that no run with at most as much x beats: the best loss reachable with each x (ascending)."""
    order = np.argsort(x, kind="stable")
    keep_x, keep_l, best = [], [], np.inf
    for i in order:
        if loss[i] < best:
            best = loss[i]
            keep_x.append(x[i])
            keep_l.append(loss[i])
    return np.asarray(keep_x), np.asarray(keep_l)


def fit_power_law(x: np.ndarray, loss: np.ndarray, envelope: bool = True) -> PowerLaw:
    """Kaplan's L(x) = (x_c/x)^k, a least-squares line in log-log space (through the lower envelope by
    default: Kaplan's L(N) and L(D) describe a model not limited by the other resource)."""
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if envelope:
        x, loss = lower_envelope(x, loss)
    if len(np.unique(x)) < 2:
        raise UserError("a power law needs at least two distinct values of x on the frontier")
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    k = -slope
    if k <= 0:
        raise UserError("the loss does not fall with x in these runs; no power law L = (x_c/x)^k fits")
    return PowerLaw(float(np.exp(intercept / k)), float(k))
