"""RL fine-tuning pieces: GAE, PPO policy/value losses, KL-shaped rewards, and GRPO.

All per-token tensors are (B, T) over the generated positions with a ``mask`` (1 = response token the policy
produced and is trained on). Log-probabilities are those of the produced tokens, e.g. from
``shifted_token_logprobs`` (so its mask is the input-aligned response mask shifted by one: ``mask[:, 1:]``).
"""

from __future__ import annotations

from typing import Literal

import torch

from omnilm.objectives.logprobs import masked_mean


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) per-token rewards and values.

    δ_t = r_t + γ·V_{t'} − V_t and A_t = δ_t + γλ·A_{t'}, where t' is the next response token after t.
    The value after the last response token is 0 (the episode ends there). Masked positions are skipped
    rather than discounted through, so prompt padding or inserted non-policy tokens do not change the result.
    Returns (advantages, returns = advantages + values), both zero off the mask; no gradient flows.
    """
    valid = mask.bool()
    rewards, values = rewards.float(), values.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # Only response tokens become "the next step" for the positions before them.
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        advantages[:, t] = torch.where(valid[:, t], advantage, 0.0)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean)/sqrt(var + eps) over the masked entries (population variance); zero off the mask.

    With ``shift_mean=False`` the mean is added back, scaling without centring (as is usual for rewards).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, 0.0)


def _clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) with ρ = exp(logp − old_logp), and where the clip is active."""
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate, averaged over all response tokens of the batch.

    L = mean_t −min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε)·A_t), ρ_t = π(a_t)/π_old(a_t). Where the clipped term is
    the smaller objective the token has zero gradient. Metrics: ``clipfrac`` (fraction of tokens where the
    clip is active) and ``approx_kl`` = mean (ρ − 1) − log ρ, an unbiased, non-negative estimate of
    KL(π_old ‖ π) from the old policy's samples.
    """
    advantages = advantages.detach()
    per_token, clipped = _clipped_surrogate(logprobs, old_logprobs, advantages, clip)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        clipfrac = masked_mean(clipped, mask)
    return loss, {"clipfrac": float(clipfrac), "approx_kl": float(approx_kl)}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss L = 0.5·mean_t max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −ε, ε) − R_t)²).

    Taking the larger error stops the value head from moving further than ε from the rollout's values in one
    update. Metrics: ``clipfrac`` (fraction of tokens where the clipped error is the larger).
    """
    returns, old_values = returns.detach(), old_values.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > error).float(), mask)
    return loss, {"clipfrac": float(clipfrac)}


@torch.no_grad()
def kl_penalty_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token RLHF rewards (B, T): r_t = −β·(log π(a_t) − log π_ref(a_t)), plus the score on the last token.

    ``score`` (B,) is the sequence-level reward (reward model or checker) and lands on the last response token
    of each row; rows without response tokens get no score. Zero off the mask.
    """
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * (logprobs.float() - ref_logprobs.float()), 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, -1).max(dim=1).values
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += score.float()[rows]
    return rewards


@torch.no_grad()
def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages (B,) for B = n_prompts·G rewards, the G samples of a prompt consecutive.

    A_i = (r_i − mean_g(r)) / (std_g(r) + ε) with the population std (unbiased=False), so a group of equal
    rewards gets A = 0. ``scale=False`` gives A_i = r_i − mean_g(r) (Dr. GRPO, which drops the std
    normalisation because it up-weights groups that are nearly all right or all wrong).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"expected a flat batch of rewards divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.flatten()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate exp(ref − logp) − (ref − logp) − 1: unbiased on π's samples, always ≥ 0."""
    diff = ref_logprobs - logprobs
    return torch.expm1(diff) - diff


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2, kl_coef: float = 0.04,
              aggregation: Literal["sequence", "token"] = "sequence") -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss: per-token clipped surrogate with the sequence's advantage, plus β·KL to the reference.

    ℓ_{i,t} = −min(ρ_{i,t}·A_i, clip(ρ_{i,t}, 1−ε, 1+ε)·A_i) + β·k3_{i,t}, ρ = π/π_old, β = ``kl_coef``.
    ``sequence`` (the GRPO paper): L = (1/G) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}, every sequence weighing the same
    whatever its length. ``token``: L = Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|, every token weighing the same (DAPO,
    Dr. GRPO), which removes the paper's preference for short wrong and long right answers.
    ``advantages`` is (B,) from ``grpo_advantages``. Metrics: ``kl`` and ``clipfrac`` under the same reduction.
    """
    if aggregation not in ("sequence", "token"):
        raise ValueError(f"unknown aggregation {aggregation!r}; expected 'sequence' or 'token'")
    surrogate, clipped = _clipped_surrogate(logprobs, old_logprobs, advantages.detach()[:, None], clip)
    kl = k3_kl(logprobs, ref_logprobs.detach())
    per_token = surrogate + kl_coef * kl

    def reduce(x: torch.Tensor) -> torch.Tensor:
        if aggregation == "token":
            return masked_mean(x, mask)
        return masked_mean(x, mask, dim=1).mean()

    loss = reduce(per_token)
    return loss, {"kl": float(reduce(kl.detach())), "clipfrac": float(reduce(clipped))}
