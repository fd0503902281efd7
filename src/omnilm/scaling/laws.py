"""Scaling-law forms and what follows from them: loss predictions, compute-optimal allocation, compute budgets.

Notation (Kaplan et al. 2020; Hoffmann et al. 2022, "Chinchilla"): N parameters, D training tokens,
C ≈ 6·N·D training FLOPs, L the validation loss in nats per token.

- Chinchilla: L(N, D) = E + A/N^α + B/D^β. Minimising it subject to 6·N·D = C gives
  N_opt(C) = G·(C/6)^{β/(α+β)}, D_opt(C) = G⁻¹·(C/6)^{α/(α+β)}, G = (αA/(βB))^{1/(α+β)}.
- Kaplan: L(N) = (N_c/N)^{α_N} and L(D) = (D_c/D)^{α_D}, each with the other resource unlimited.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from omnilm.errors import UserError

#: Dense bf16 tensor-core peak FLOP/s per GPU (vendor data sheets; SXM parts where there are several).
GPU_PEAK_FLOPS: dict[str, float] = {
    "v100": 125e12,
    "t4": 65e12,
    "a10": 125e12,
    "a100": 312e12,
    "l4": 121e12,
    "l40s": 362e12,
    "rtx4090": 165e12,
    "h100": 989e12,
    "h200": 989e12,
    "b200": 2250e12,
}

#: The compute-optimal ratio of training tokens to parameters that Chinchilla's approaches 1 and 2 give
#: (≈ 20 tokens per parameter; Chinchilla itself: 70B parameters, 1.4T tokens, 5.76e23 FLOPs).
TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta. Defaults: the published Chinchilla fit (approach 3)."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, n: float, d: float) -> float:
        """Predicted loss of a model of ``n`` parameters trained on ``d`` tokens."""
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b (a + b = 1)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:  # noqa: N802 - the paper's name
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the loss at ``flops`` = 6·N·D."""
        if flops <= 0:
            raise UserError(f"compute budget must be positive, got {flops}")
        n = self.G * (flops / 6) ** self.a
        return n, flops / (6 * n)

    def tokens_for_loss(self, n: float, target: float) -> float:
        """The number of tokens D at which a model of ``n`` parameters reaches loss ``target``.

        Raises a UserError when the target lies at or below what infinite data gives for this size,
        E + A/N^α (the model is too small to ever reach it).
        """
        floor = self.E + self.A / n ** self.alpha
        if target <= floor:
            raise UserError(f"a model of {n:.3g} parameters never reaches loss {target}: even infinite data gives "
                            f"{floor:.4f} under this law")
        return (self.B / (target - floor)) ** (1 / self.beta)

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"a": self.a, "b": self.b, "G": self.G}


@dataclass(frozen=True)
class PowerLaw:
    """Kaplan's single-variable form L(x) = (x_c / x)^exponent."""

    x_c: float
    exponent: float

    def loss(self, x: float) -> float:
        return (self.x_c / x) ** self.exponent


#: Kaplan et al. (2020): L(N) = (N/8.8e13)^-0.076 (non-embedding parameters), L(D) = (D/5.4e13)^-0.095.
KAPLAN_N = PowerLaw(8.8e13, 0.076)
KAPLAN_D = PowerLaw(5.4e13, 0.095)


def training_flops(n: float, d: float) -> float:
    """C ≈ 6·N·D: forward (2·N per token) plus backward (4·N per token)."""
    return 6.0 * n * d


def flops_from_gpu_hours(gpu_hours: float, gpu: str, mfu: float) -> float:
    """The training FLOPs that ``gpu_hours`` of ``gpu`` deliver at model-FLOPs utilisation ``mfu``."""
    key = gpu.lower().replace("-", "").replace(" ", "")
    if key not in GPU_PEAK_FLOPS:
        raise UserError(f"unknown GPU {gpu!r}; known: {', '.join(sorted(GPU_PEAK_FLOPS))}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must lie in (0, 1], got {mfu}")
    if gpu_hours <= 0:
        raise UserError(f"--gpu-hours must be positive, got {gpu_hours}")
    return gpu_hours * 3600.0 * GPU_PEAK_FLOPS[key] * mfu


def rule_of_thumb_allocation(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with D = k·N and 6·N·D = C: N = sqrt(C / (6k))."""
    n = math.sqrt(flops / (6 * tokens_per_param))
    return n, tokens_per_param * n
