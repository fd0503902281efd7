"""Causal language modelling: next-token cross-entropy."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.model.moe import router_aux_loss
from omnilm.model.transformer import Transformer
from omnilm.objectives.chunked_ce import IGNORE_INDEX
from omnilm.train.distributed import unwrap


def causal_lm_loss(model: nn.Module, tokens: torch.Tensor, reduction: Literal["mean", "sum"] = "mean",
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean (or summed) next-token loss over a (B, T+1) token batch: inputs = tokens[:, :-1], targets =
    tokens[:, 1:]. A mixture-of-experts model's router losses (load balancing, z-loss, weighted by its config)
    are added to the mean loss and logged."""
    loss = next_token_loss(model, tokens[:, :-1], tokens[:, 1:], reduction)
    return with_router_loss(model, loss, reduction)


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """fp32 cross-entropy of ``model``'s logits on ``inputs`` (B, T) against ``targets`` (B, T, IGNORE_INDEX
    where unscored). omnilm's decoder computes it itself, so that its ``loss_chunk_tokens`` can keep the full
    logits from ever existing; any other model's logits are scored here."""
    if isinstance(unwrap(model), Transformer):
        return model(inputs, targets=targets, reduction=reduction)
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def with_router_loss(model: nn.Module, loss: torch.Tensor, reduction: Literal["mean", "sum"] = "mean",
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss`` plus the router losses of an MoE model's last forward (mean reduction only: a summed loss is
    normalised later by its caller), with the values to log; a dense model's loss is returned as it is."""
    aux, logs = router_aux_loss(model)
    if aux is None or reduction != "mean":
        return loss, logs
    return loss + aux, logs | {"lm_loss": loss.item()}


def masked_targets(tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets (B, L-1) of ``tokens`` (B, L), IGNORE_INDEX where ``loss_mask`` is 0."""
    return tokens[:, 1:].masked_fill(loss_mask[:, 1:] == 0, IGNORE_INDEX)


def loss_token_count(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens of a ``tokens``/``loss_mask`` batch the masked loss scores (the first token never is)."""
    return int(batch["loss_mask"][:, 1:].sum())


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], reduction: Literal["mean", "sum"] = "mean",
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token loss over the tokens whose ``loss_mask`` is 1 (e.g. assistant replies in chat SFT).

    ``batch["tokens"]`` and ``batch["loss_mask"]`` are (B, L); position t is predicted from positions < t, so the
    mask of the first token is never used. The mean is over masked tokens of the whole micro-batch; with
    ``reduction="sum"`` the token losses are summed (for normalising over a larger batch than this one).
    """
    tokens, mask = batch["tokens"], batch["loss_mask"]
    targets = masked_targets(tokens, mask)
    loss = next_token_loss(model, tokens[:, :-1], targets, reduction)
    return loss, {"loss_tokens": float(loss_token_count(batch))}


def grouped_masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], groups: int,
                           ) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`masked_lm_loss` summed (``reduction="sum"``), computed as up to ``groups`` forward passes over rows of
    similar length (:func:`length_groups`), each trimmed after its last scored token.

    Right padding and the tokens after a row's last scored one change none of its losses (the attention is causal),
    so the sum equals the whole padded batch's; what changes is the work: a batch that mixes short and long
    conversations no longer pads every row to the longest one. One group is the batch as it is, in one pass."""
    if groups <= 1:
        return masked_lm_loss(model, batch, reduction="sum")
    total: torch.Tensor | None = None
    for group in length_groups(batch, groups):
        loss, _ = masked_lm_loss(model, group, reduction="sum")
        total = loss if total is None else total + loss
    assert total is not None
    return total, {"loss_tokens": float(loss_token_count(batch))}


def length_groups(batch: dict[str, torch.Tensor], groups: int) -> list[dict[str, torch.Tensor]]:
    """The rows of a ``tokens``/``loss_mask`` batch in at most ``groups`` batches of rows of similar length, each
    cut after its longest row's last scored token, split where the padded total is least (:func:`cheapest_split`).
    """
    tokens, mask = batch["tokens"], batch["loss_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    # A row's needed length: through its last scored token (at least two tokens: one input, one target).
    needed = ((mask != 0) * (positions + 1)).amax(dim=1).clamp(min=2).tolist()
    order = sorted(range(len(needed)), key=needed.__getitem__)
    out = []
    for start, stop in cheapest_split([needed[i] for i in order], groups):
        rows = torch.as_tensor(order[start:stop], device=tokens.device)
        length = needed[order[stop - 1]]
        out.append({"tokens": tokens[rows, :length], "loss_mask": mask[rows, :length]})
    return out


def cheapest_split(lengths: list[int], groups: int) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into at most ``groups`` contiguous runs ``[start, stop)`` so that the sum over runs
    of (rows × the run's longest length), the tokens a padded forward pass computes, is least.

    Dynamic programming over cut points, O(groups · n²); n is a micro-batch's row count (written out here rather
    than taken from a library: it is the one place this scheduling problem comes up)."""
    n = len(lengths)
    if n == 0:
        return []
    groups = max(1, min(groups, n))
    inf = float("inf")
    # cost[g][i]: least padded tokens for the first i rows in g runs; cut[g][i]: where the last run starts.
    cost = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    cost[0][0] = 0
    for g in range(1, groups + 1):
        for i in range(1, n + 1):
            for j in range(g - 1, i):
                candidate = cost[g - 1][j] + (i - j) * lengths[i - 1]
                if candidate < cost[g][i]:
                    cost[g][i], cut[g][i] = candidate, j
    best = min(range(1, groups + 1), key=lambda g: (cost[g][n], g))
    runs, stop = [], n
    for g in range(best, 0, -1):
        start = cut[g][stop]
        runs.append((start, stop))
        stop = start
    return runs[::-1]


def token_byte_lengths(tokenizer) -> torch.Tensor:  # noqa: ANN001 - omnilm.tokenizer.Tokenizer
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte.

    In byte-level BPE every character of a token's string stands for exactly one byte.
    """
    backend = tokenizer.backend
    special = {t.content for t in backend.get_added_tokens_decoder().values()}
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        lengths[index] = 0 if token in special else len(token)
    return lengths


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: list[torch.Tensor], byte_lengths: torch.Tensor | None = None,
                ) -> dict[str, float]:
    """Validation loss (nats/token) and, given token byte lengths, bits per byte over fixed batches."""
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for tokens in batches:
        tokens = tokens.to(next(model.parameters()).device)
        logits = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total_nats += float(nats)
        total_tokens += targets.numel()
        if byte_lengths is not None:
            total_bytes += int(byte_lengths.to(targets.device)[targets].sum())
    result = {"val_loss": total_nats / max(total_tokens, 1)}
    if byte_lengths is not None and total_bytes:
        result["val_bpb"] = total_nats / (math.log(2) * total_bytes)
    return result
