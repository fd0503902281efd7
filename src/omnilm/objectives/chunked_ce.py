"""Cross-entropy of a linear LM head, computed over chunks of tokens so that the (tokens × vocab) logits never
exist at once.

With a 150k vocabulary the logits of a batch are the largest tensors of a training step: the plain path keeps
the logits, their fp32 copy, the log-softmax saved for backward and the gradient, each tokens × vocab.
:func:`linear_cross_entropy` instead takes the hidden states and the head's weight and, for one chunk of tokens
at a time, computes the chunk's logits in fp32, its loss, and at once its gradients with respect to the hidden
states and the weight (the loss is a scalar, so the gradient of the sum is known in the forward pass; backward
only scales it by the incoming gradient). Peak extra memory is O(chunk × vocab), and no logits are recomputed.

Under autocast the head's matmuls run in the autocast dtype and the softmax in fp32, as the plain path
``F.cross_entropy(lm_head(h).float(), ...)`` does.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

IGNORE_INDEX = -100


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed next-token NLL of ``hidden @ weight.T`` over non-ignored targets, with the gradients found chunk by
    chunk in the forward pass."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                ignore_index: int, grad_enabled: bool) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        # needs_input_grad says True under no_grad too: only the caller's grad mode tells whether to bother.
        want_hidden, want_weight = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)
                target = targets[start:start + chunk]
                valid = target != ignore_index
                safe = torch.where(valid, target, 0).unsqueeze(1)
                # NLL = log Σ exp(z) − z_target over z = logits − max, as log_softmax computes it: subtracting
                # logsumexp from the raw target logit would lose the digits of a confident (small) loss.
                shifted = (h @ w.T).float()
                shifted -= shifted.amax(dim=1, keepdim=True)
                target_shifted = shifted.gather(1, safe).squeeze(1)
                probs = shifted.exp_()
                sums = probs.sum(dim=1)
                total += ((sums.log() - target_shifted) * valid).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d(sum of NLL)/d logits = softmax - one_hot(target), zero on ignored rows; built in place.
                grad = probs.div_(sums.unsqueeze(1))
                grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
                grad.mul_(valid.unsqueeze(1))
                grad = grad.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = grad @ w
                if grad_weight is not None and dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)  # no (vocab × d) temporary per chunk
                elif grad_weight is not None:
                    grad_weight += grad.T @ h
        ctx.grads = (grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy supports one backward pass per forward pass")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # scaled in place below: a second backward would read scaled values
        scale = grad_output.float()
        if grad_hidden is not None:
            grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(scale.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                         reduction: Literal["mean", "sum"] = "mean", ignore_index: int = IGNORE_INDEX,
                         ) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` in fp32 without materialising all the logits.

    ``hidden`` (..., d) and ``targets`` (...) are flattened to tokens; ``weight`` is the head's (vocab, d) matrix
    (the embedding matrix when tied). Targets equal to ``ignore_index`` add nothing; ``reduction="mean"``
    divides by the number of the others (NaN when there are none, as ``F.cross_entropy`` gives). ``weight`` is
    used as a plain tensor: a tensor-parallel (sharded) head takes the plain path.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, not {chunk_tokens}")
    total = _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, ignore_index, torch.is_grad_enabled())
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()
