"""Selective language modelling (Rho-1, Lin et al. 2024): train only on the tokens worth learning.

Every target token gets an excess loss, the current model's loss minus a reference model's (a model trained on
clean data, frozen): tokens the reference finds easy but the model does not yet are the learnable ones, while
noise is hard for both. The loss is the mean cross-entropy over the ``keep`` fraction of a batch's tokens with
the highest excess loss (the selection itself carries no gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.objectives.lm import with_router_loss


def token_losses(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token next-token losses (B, T) of a (B, T+1) window."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1)


def select_tokens(excess: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean mask of the ceil(keep · n) entries of ``excess`` with the highest values (ties: lowest index)."""
    flat = excess.flatten()
    count = max(1, min(flat.numel(), math.ceil(keep * flat.numel())))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(count).indices] = True
    return mask.view_as(excess)


def selective_objective(reference: nn.Module, keep: float,
                        ) -> Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]:
    """The objective: mean loss over the top ``keep`` fraction of tokens by excess loss against ``reference``."""
    if not 0 < keep <= 1:
        raise ValueError(f"selective keep fraction must be in (0, 1], got {keep}")

    def loss(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        losses = token_losses(model, tokens)
        with torch.no_grad():
            excess = losses.detach() - token_losses(reference, tokens)
        mask = select_tokens(excess, keep)
        selected = losses[mask].mean()
        total, logs = with_router_loss(model, selected)
        return total, logs | {"lm_loss_all": losses.detach().mean().item(), "selected_loss": selected.item()}

    return loss
