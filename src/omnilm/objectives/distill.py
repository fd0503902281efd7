"""Knowledge distillation: temperature-softened KL to a teacher mixed with the hard-label loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnilm.objectives.lm import IGNORE_INDEX


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = IGNORE_INDEX,
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """L = α·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) + (1 − α)·CE(z_S, labels).

    Logits are (B, T, V) and ``labels`` (B, T) is already aligned with them (labels[b, t] is the target of
    position t; shift before calling). Both terms are averaged over the tokens whose label is not
    ``ignore_index``. The τ² factor keeps the soft-target gradients on the scale of the hard-label ones as τ
    changes. The teacher is treated as a constant. Metrics: ``kl`` (at temperature τ, without τ²) and ``ce``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    mask = labels != ignore_index
    student_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl_per_token = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    kl = torch.where(mask, kl_per_token, 0.0).sum() / mask.sum().clamp(min=1)
    ce_per_token = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(),
                                   ignore_index=ignore_index, reduction="none")
    ce = ce_per_token.sum() / mask.sum().clamp(min=1)  # ignored positions contribute 0 to the sum
    loss = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    return loss, {"kl": float(kl.detach()), "ce": float(ce.detach())}
