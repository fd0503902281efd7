"""Multi-token prediction loss: next-token cross-entropy plus each extra head's, weighted per head."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.objectives.lm import IGNORE_INDEX, with_router_loss


def multi_token_objective(weights: Sequence[float],
                          ) -> Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]:
    """The objective of a ``MultiTokenModel`` on (B, T+1) token windows: CE(t+1) + Σ_k w_k · CE_k(t+1+k), head k
    scored on the T-k positions whose target lies inside the window; every loss is logged (``mtp_loss_k``)."""

    def loss(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits, heads = model(tokens[:, :-1], with_heads=True, tokens=tokens)
        main = _cross_entropy(logits, tokens[:, 1:])
        total, logs = main, {"lm_loss": main.item()}
        for k, (weight, head_logits) in enumerate(zip(weights, heads, strict=True), start=1):
            head_loss = _cross_entropy(head_logits, tokens[:, 1 + k:])
            total = total + weight * head_loss
            logs[f"mtp_loss_{k}"] = head_loss.item()
        total, router_logs = with_router_loss(model, total)
        return total, router_logs | logs

    return loss


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
