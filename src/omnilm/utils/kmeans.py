"""k-means on torch: k-means++ seeding (Arthur and Vassilvitskii, 2007), then Lloyd iterations.

Every step is batched over points (distances by the expansion ‖x‖² − 2x·c + ‖c‖², in row blocks that bound the
memory of the (points, K) distance matrix); the only Python loops run over centroids while seeding and over
iterations. The objective, the mean squared distance of a point to its nearest centroid, never increases from
one iteration to the next; a cluster left empty is moved onto the point farthest from its centroid, which keeps
that promise. Used by the speech codec (:mod:`omnilm.omni.codec`) and Auto-CoT (:mod:`omnilm.prompting.auto_cot`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Rows of the (rows, K) distance matrix computed at once: 2^24 entries, 64 MiB in float32.
_DISTANCE_BLOCK = 1 << 24


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """‖x_i − c_k‖² for x (N, D) and centroids (K, D) → (N, K), clamped at 0 (the expansion can round below)."""
    cross = x @ centroids.T  # (N, K)
    return ((x * x).sum(1, keepdim=True) - 2.0 * cross + (centroids * centroids).sum(1)).clamp(min=0.0)


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest centroid of every row of x (N, D): codes (N,) int64 and their squared distances (N,).

    Ties go to the lowest index. Rows are taken in blocks so that the distance matrix stays small.
    """
    codes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    distances = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = max(1, _DISTANCE_BLOCK // max(1, centroids.shape[0]))
    for start in range(0, x.shape[0], step):
        block = squared_distances(x[start:start + step], centroids)  # (rows, K)
        best, index = block.min(dim=1)
        codes[start:start + step] = index
        distances[start:start + step] = best
    return codes, distances


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k seeds (k, D) among the rows of x (N, D): the first uniformly, each next one with probability
    proportional to its squared distance to the nearest seed so far (uniformly once every point is a seed's
    duplicate). Needs 1 ≤ k ≤ N."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means++ needs 1 <= k <= points, got k={k} for {n} points")
    # Sampling happens on the CPU so that a seed gives the same codebook on every device.
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    nearest = squared_distances(x, x[first:first + 1])[:, 0]  # (N,) to the nearest seed
    for _ in range(1, k):
        weights = nearest.double().cpu()
        if not float(weights.sum()) > 0.0:
            weights = torch.ones(n, dtype=torch.float64)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        nearest = torch.minimum(nearest, squared_distances(x, x[pick:pick + 1])[:, 0])
    return x[torch.tensor(chosen, device=x.device)].clone()


def lloyd_step(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One Lloyd iteration: assign every point, move every centroid to the mean of its points.

    Returns the new centroids and the objective *before* the move (mean squared distance to the nearest of the
    given centroids). Empty clusters take the points farthest from their centroids, one each.
    """
    codes, distances = assign(x, centroids)
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, codes, x)  # (K, D)
    counts = torch.bincount(codes, minlength=k)  # (K,)
    updated = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None].to(x.dtype), centroids)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        # A point moved onto a centroid of its own costs 0 there; so every point is no farther from some new
        # centroid than from its old cluster's mean, and the objective cannot rise.
        far = distances.topk(min(len(empty), x.shape[0])).indices
        updated[empty[:len(far)]] = x[far]
    return updated, float(distances.mean())


@dataclass
class KMeansResult:
    """A fitted codebook and the objective before each iteration and after the last (``history[0]`` is the
    k-means++ seeding's)."""

    centroids: torch.Tensor
    history: list[float] = field(default_factory=list)

    @property
    def objective(self) -> float:
        """Mean squared distance of a point to its nearest centroid, for the final centroids."""
        return self.history[-1]


def kmeans(x: torch.Tensor, k: int, iterations: int = 50, tolerance: float = 1e-4, seed: int = 0) -> KMeansResult:
    """k-means of the rows of x (N, D): k-means++ seeds, then up to ``iterations`` Lloyd iterations.

    Stops early once an iteration lowers the objective by less than ``tolerance`` times its value. x keeps its
    dtype and device; k is capped at N (a codebook larger than the data would only repeat points).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty (points, dims) matrix, got shape {tuple(x.shape)}")
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(x, min(k, x.shape[0]), generator)
    history: list[float] = []
    for _ in range(iterations):
        moved, before = lloyd_step(x, centroids)
        history.append(before)
        if len(history) > 1 and history[-2] - before <= tolerance * history[-2]:
            break
        centroids = moved
    else:
        history.append(float(assign(x, centroids)[1].mean()))
    return KMeansResult(centroids, history)
