"""Copying from context: how well a model predicts the second half of a random token sequence written twice.

The first copy is noise (no model can predict it: its loss is about ln(vocabulary size)); the second is
predicted exactly by an induction head (:mod:`omnilm.data.synth.repeats`). ``second_half_loss`` far below
``first_half_loss`` says the model copies; ``copy_accuracy`` is the share of second-copy tokens it predicts
greedily. The first token of the second copy is left out of both: nothing marks where the copy begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def repeated_sequences(root: str | Path, split: str = "val") -> list[np.ndarray]:
    """The sequences ``x`` of the documents ``x x <|endoftext|>`` in one split of a repeats dataset."""
    from omnilm.data.loader import TokenDataset

    dataset = TokenDataset.open(root, split)
    starts = np.concatenate([np.load(path) for path in sorted((Path(root) / split).glob("shard-*.docs.npy"))])
    ends = [*starts[1:].tolist(), len(dataset)]
    return [dataset.read(int(start), (end - start - 1) // 2).astype(np.int64) for start, end in zip(starts, ends,
                                                                                                  strict=True)]


@torch.no_grad()
def evaluate_copying(model: nn.Module, sequences: Sequence[np.ndarray], batch_size: int = 32,
                     ) -> dict[str, float]:
    """Mean loss (nats/token) on each copy and greedy accuracy on the second, over ``sequences`` (each ≥ 2)."""
    device = next(model.parameters()).device
    totals = {"first": 0.0, "second": 0.0, "correct": 0.0, "tokens": 0}
    for begin in range(0, len(sequences), batch_size):
        batch = [torch.as_tensor(s) for s in sequences[begin:begin + batch_size] if len(s) >= 2]
        if not batch:
            continue
        width = 2 * max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        first = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        second = torch.zeros_like(first)
        for row, sequence in enumerate(batch):
            n = len(sequence)
            ids[row, :2 * n] = torch.cat([sequence, sequence])
            first[row, :n - 1] = True      # targets x[1:] of the first copy
            second[row, n:2 * n - 1] = True  # targets x[1:] of the second copy
        # right padding: causal attention never lets a real position see it
        logits = model(ids[:, :-1].to(device)).float()
        targets = ids[:, 1:].to(device)
        nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets).cpu()
        hits = (logits.argmax(-1) == targets).cpu()
        totals["first"] += float(nats[first].sum())
        totals["second"] += float(nats[second].sum())
        totals["correct"] += float(hits[second].sum())
        totals["tokens"] += int(second.sum())
    tokens = max(totals["tokens"], 1)  # both copies hold the same number of scored tokens
    return {"first_half_loss": totals["first"] / tokens, "second_half_loss": totals["second"] / tokens,
            "copy_accuracy": totals["correct"] / tokens, "sequences": float(len(sequences))}
