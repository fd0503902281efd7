"""Streaming (B, T+1) token batches from tokenised shards: seeded, resumable, rank-sharded, mixable.

How a batch is drawn (written for this project; every choice is a pure function of counters, which is what
makes resume exact and ranks consistent):

- A dataset is cut into windows of ``T+1`` tokens with stride ``T`` (each window's last token is the next
  window's first input, so no token is wasted as a target). Every epoch has its own seeded window order and
  its own random offset, so repeated epochs over a small corpus see documents in new contexts.
- The *global* batch is ``batch_size × world_size`` rows; rank ``r`` keeps rows ``[r·B, (r+1)·B)``. One
  process with batch 8 therefore sees exactly the rows that two processes with batch 4 see together.
- With several datasets, the dataset of each row is drawn from a generator seeded by (seed, batch index)
  with the current weights, and each dataset keeps a count of the windows taken from it. Every rank draws
  the whole global batch's choices, so the counts agree across ranks without communication.

The loader's state is just those counters (``state_dict``); restoring it reproduces the exact next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnilm.data.tokenize import read_meta
from omnilm.errors import UserError

Weights = Mapping[str, float] | Callable[[int], Mapping[str, float]]


@dataclass
class TokenDataset:
    """One split of a tokenised dataset: its shards memory-mapped and read as one long token array."""

    root: Path
    split: str
    shards: list[np.memmap]
    eos_id: int
    vocab_size: int

    @classmethod
    def open(cls, root: str | Path, split: str = "train") -> TokenDataset:
        root = Path(root)
        meta = read_meta(root)
        if split not in meta["splits"]:
            raise UserError(f"{root}: no split {split!r} (have {sorted(meta['splits'])})")
        dtype = np.dtype(meta["dtype"])
        shards = [np.memmap(root / s["file"], dtype=dtype, mode="r") for s in meta["splits"][split]["shards"]
                  if s["tokens"] > 0]
        dataset = cls(root, split, shards, meta["eos_id"], meta["vocab_size"])
        if len(dataset) < 2:
            raise UserError(f"{root}: split {split!r} is empty")
        return dataset

    def __post_init__(self) -> None:
        self._ends = np.cumsum([len(s) for s in self.shards]) if self.shards else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated shards."""
        pieces, end = [], start + length
        shard = int(np.searchsorted(self._ends, start, side="right"))
        while start < end:
            shard_begin = int(self._ends[shard - 1]) if shard else 0
            stop = min(end, int(self._ends[shard]))
            pieces.append(self.shards[shard][start - shard_begin:stop - shard_begin])
            start, shard = stop, shard + 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])


class _WindowOrder:
    """The seeded window order of one dataset, epoch by epoch (the current epoch's permutation is cached)."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int, stream: int) -> None:
        # Sized for the largest offset, so every epoch has the same number of windows whatever its offset.
        self.per_epoch = (n_tokens - seq_len) // seq_len
        if self.per_epoch < 1:
            raise UserError(f"a dataset of {n_tokens} tokens is too short for windows of seq_len+1 = "
                            f"{seq_len + 1} tokens; lower seq_len or add data")
        self.seq_len, self.seed, self.stream = seq_len, seed, stream
        self._epoch, self._offset, self._order = -1, 0, np.zeros(0, dtype=np.int64)

    def start(self, index: int) -> int:
        """Token offset of the ``index``-th window drawn from this dataset (counting over all epochs)."""
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self.stream, epoch])
            self._epoch, self._offset = epoch, int(rng.integers(self.seq_len))
            self._order = rng.permutation(self.per_epoch)
        return self._offset + int(self._order[position]) * self.seq_len


class BatchLoader:
    """Yields ``(batch_size, seq_len + 1)`` int64 token tensors for this rank from one or more datasets.

    ``weights`` maps dataset names to mixture weights, or is a function of the optimizer step returning such
    a mapping (a curriculum); ``batches_per_step`` converts the loader's batch count into that step when
    gradient accumulation draws several batches per step.
    """

    def __init__(self, datasets: TokenDataset | Mapping[str, TokenDataset], batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, weights: Weights | None = None,
                 batches_per_step: int = 1) -> None:
        if isinstance(datasets, TokenDataset):
            datasets = {"data": datasets}
        if not datasets:
            raise UserError("BatchLoader needs at least one dataset")
        self.names = list(datasets)
        self.datasets = dict(datasets)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.batches_per_step = rank, world_size, max(1, batches_per_step)
        self.orders = {name: _WindowOrder(len(ds), seq_len, seed, stream)
                       for stream, (name, ds) in enumerate(self.datasets.items())}
        self._weights = weights
        self.batch_index = 0
        self.taken = dict.fromkeys(self.names, 0)
        self.current_weights(0)  # validate now rather than mid-run

    def set_weights(self, weights: Weights) -> None:
        """Change the mixture from the next batch on (e.g. when a new stage starts)."""
        self._weights = weights
        self.current_weights(self.batch_index // self.batches_per_step)

    def current_weights(self, step: int) -> np.ndarray:
        raw = self._weights(step) if callable(self._weights) else self._weights
        raw = dict.fromkeys(self.names, 1.0) if raw is None else raw
        unknown = set(raw) - set(self.names)
        if unknown:
            raise UserError(f"mixture weights name unknown dataset(s) {sorted(unknown)}; have {self.names}")
        values = np.array([float(raw.get(name, 0.0)) for name in self.names])
        if (values < 0).any() or values.sum() <= 0:
            raise UserError(f"mixture weights must be non-negative with a positive sum, got {dict(raw)}")
        return values / values.sum()

    def _choices(self, rows: int) -> np.ndarray:
        if len(self.names) == 1:
            return np.zeros(rows, dtype=np.int64)
        probs = self.current_weights(self.batch_index // self.batches_per_step)
        draws = np.random.default_rng([self.seed, 1 << 20, self.batch_index]).random(rows)
        return np.minimum(np.searchsorted(np.cumsum(probs), draws, side="right"), len(self.names) - 1)

    def next_batch(self) -> torch.Tensor:
        rows = self.batch_size * self.world_size
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        batch = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row, choice in enumerate(self._choices(rows)):
            name = self.names[choice]
            index = self.taken[name]
            self.taken[name] += 1
            if row in mine:
                start = self.orders[name].start(index)
                batch[row - mine.start] = self.datasets[name].read(start, self.seq_len + 1)
        self.batch_index += 1
        return torch.from_numpy(batch)

    def __iter__(self):  # noqa: ANN204
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "taken": dict(self.taken), "seed": self.seed,
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("global_batch", self.batch_size * self.world_size) != self.batch_size * self.world_size:
            raise UserError(f"cannot resume: the checkpoint's global batch was {state['global_batch']} rows, "
                            f"now it is {self.batch_size * self.world_size}")
        unknown = set(state["taken"]) - set(self.names)
        if unknown:
            raise UserError(f"cannot resume: the checkpoint's loader has datasets {sorted(unknown)} not configured")
        self.batch_index = int(state["batch_index"])
        self.taken = dict.fromkeys(self.names, 0) | {k: int(v) for k, v in state["taken"].items()}
