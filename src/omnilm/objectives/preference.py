"""Pairwise preference losses: DPO / IPO on policy log-probabilities and Bradley–Terry for reward models."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
             label_smoothing: float = 0.0, reduction: Literal["mean", "sum"] = "mean",
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Direct preference optimisation loss, averaged (or, with ``reduction="sum"``, summed) over the pairs.

    Inputs are per-sequence log-probabilities (B,) of the chosen (y_w) and rejected (y_l) responses under the
    policy π and the frozen reference. With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):

    - ``sigmoid`` (DPO): L = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h), ε = ``label_smoothing`` (conservative DPO:
      the label is assumed flipped with probability ε; ε = 0 is plain DPO).
    - ``ipo``: L = (h − 1/(2β))². The IPO paper uses length-normalised log-probabilities, so for IPO the caller
      passes per-token averages (``sequence_logprobs(..., average=True)``); the sums work but change the scale.

    Metrics: implicit rewards β·(log π − log π_ref) of chosen and rejected, their mean margin, and the
    fraction of pairs where the chosen reward is higher.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")
    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    metrics = {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margin": float((chosen_rewards - rejected_rewards).mean()),
    }
    return (losses.sum() if reduction == "sum" else losses.mean()), metrics


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-model loss L = −mean log σ(r_w − r_l) over pairs of scalar rewards (B,).

    Metrics: accuracy (fraction with r_w > r_l) and mean margin r_w − r_l.
    """
    margin = reward_chosen - reward_rejected
    loss = -F.logsigmoid(margin).mean()
    detached = margin.detach()
    return loss, {"accuracy": float((detached > 0).float().mean()), "margin": float(detached.mean())}
