"""Encoder–decoder training: teacher forcing on targets shifted right, cross-entropy on the real target tokens."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.objectives.lm import IGNORE_INDEX


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs (B, T): the start token, then the labels without their last position (IGNORE_INDEX → pad)."""
    inputs = torch.full_like(labels, pad_id)
    inputs[:, 0] = start_id
    inputs[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_id)
    return inputs


def seq2seq_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of ``batch["labels"]`` (IGNORE_INDEX on padding) given ``input_ids`` /
    ``attention_mask``; the decoder reads the labels shifted right."""
    from omnilm.train.distributed import unwrap

    config = unwrap(model).config
    labels = batch["labels"]
    decoder_inputs = shift_right(labels, config.decoder_start_token_id, config.pad_token_id)
    logits = model(batch["input_ids"], batch["attention_mask"], decoder_inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return loss, {}


def pad_pairs(inputs: list[list[int]], targets: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids and attention_mask from ``inputs``, labels (IGNORE_INDEX padding)."""
    from omnilm.data.examples import pad_right

    input_ids = pad_right(inputs, pad_id)
    attention_mask = pad_right([[1] * len(row) for row in inputs], 0)
    labels = pad_right(targets, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
