"""Batches of whole examples (chat turns, preference pairs) for post-training: seeded, resumable, rank-sharded.

Unlike pre-training windows, these examples are never cut or packed together: each row of a batch is one
example, right-padded to the longest in the batch. Right padding needs no attention mask under causal
attention (real tokens never look ahead at the padding), and the padding is excluded from every loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from omnilm.errors import UserError


def pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """(len(rows), longest) int64 tensor, each row followed by ``value``."""
    longest = max(len(row) for row in rows)
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class ExampleLoader:
    """Global batches of ``batch_size × world_size`` example indices in a seeded order per epoch; rank ``r``
    collates rows ``[r·B, (r+1)·B)``. The state is one counter, so resume restores the exact next batch."""

    def __init__(self, size: int, batch_size: int, collate: Callable[[list[int]], Any], seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if size < 1:
            raise UserError("no training examples (all records were skipped or filtered out)")
        self.size, self.batch_size, self.collate, self.seed = size, batch_size, collate, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def _index(self, k: int) -> int:
        epoch, position = divmod(k, self.size)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return int(self._order[position])

    def next_batch(self) -> Any:
        begin = self.position + self.rank * self.batch_size
        indices = [self._index(k) for k in range(begin, begin + self.batch_size)]
        self.position += self.batch_size * self.world_size
        return self.collate(indices)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["global_batch"] != self.batch_size * self.world_size:
            raise UserError(f"cannot resume: the checkpoint's global batch was {state['global_batch']} examples, "
                            f"now it is {self.batch_size * self.world_size}")
        self.position = int(state["position"])
