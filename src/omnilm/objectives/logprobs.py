"""Token and sequence log-probabilities, masked means and entropies shared by the post-training losses.

Convention: masks are aligned with ``input_ids`` (1 on the tokens being scored, e.g. the response).
Position t of the logits predicts token t+1, so the functions that take a model shift internally and
the mask entry of the first token is never used (nothing predicts it).
"""

from __future__ import annotations

import torch
from torch import nn


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t]) under softmax(logits[b, t]), shape (B, T), computed in float32.

    log p(y) = z_y − logsumexp(z). No shift is applied: ``labels[b, t]`` is the target of ``logits[b, t]``.
    Negative labels (e.g. IGNORE_INDEX) are gathered as token 0 so the result stays finite; mask them out.
    """
    logits = logits.float()  # bf16 log-softmax over a large vocabulary loses too many digits
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def shifted_token_logprobs(model: nn.Module, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for t < T−1, shape (B, T−1).

    Column j scores token j+1 of ``input_ids``, so a mask aligned with ``input_ids`` is applied as ``mask[:, 1:]``.
    """
    logits = model(input_ids, attention_mask=attention_mask)
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      loss_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Summed (or, with ``average``, mean) log-probability of the masked tokens of each sequence, shape (B,).

    log π(y | x) = Σ_{t : loss_mask[t] = 1} log p(input_ids[t] | input_ids[<t]).
    ``loss_mask`` (B, T) is aligned with ``input_ids``; ``loss_mask[:, 0]`` is ignored. The average divides by
    the number of scored tokens (IPO's length-normalised log-probability); a row with none gives 0.
    """
    token_lp = shifted_token_logprobs(model, input_ids, attention_mask)
    mask = loss_mask[:, 1:].bool()
    summed = torch.where(mask, token_lp, 0.0).sum(-1)
    if average:
        return summed / mask.sum(-1).clamp(min=1)
    return summed


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask over ``dim`` (all elements when None); an all-zero mask gives 0 rather than NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position, shape (B, T), in float32.

    H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v, which avoids forming log p for every vocabulary entry.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
