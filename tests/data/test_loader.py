"""The streaming loader: windows of real data, epochs, determinism, resume, rank sharding, mixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilm.data.loader import BatchLoader, TokenDataset
from omnilm.errors import UserError


def write_dataset(root: Path, tokens: np.ndarray, shard_tokens: int) -> Path:
    """A tokenised dataset written directly in the shard layout (independent of the tokenizer)."""
    shards = []
    (root / "train").mkdir(parents=True)
    for i, begin in enumerate(range(0, len(tokens), shard_tokens)):
        piece = tokens[begin:begin + shard_tokens].astype(np.uint16)
        piece.tofile(root / "train" / f"shard-{i:05d}.bin")
        shards.append({"file": f"train/shard-{i:05d}.bin", "tokens": len(piece), "documents": 1})
    meta = {"dtype": "uint16", "vocab_size": 60000, "eos_id": 0,
            "splits": {"train": {"shards": shards, "tokens": len(tokens), "documents": len(shards)}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def datasets(tmp_path: Path) -> dict[str, TokenDataset]:
    # Disjoint, strictly increasing token values: a row's first token tells its dataset and position.
    a = write_dataset(tmp_path / "a", np.arange(1, 1001), shard_tokens=300)
    b = write_dataset(tmp_path / "b", np.arange(20001, 20501), shard_tokens=500)
    return {"a": TokenDataset.open(a), "b": TokenDataset.open(b)}


def test_read_spans_shards(datasets: dict[str, TokenDataset]) -> None:
    a = datasets["a"]
    assert len(a) == 1000 and len(a.shards) == 4
    assert a.read(290, 25).tolist() == list(range(291, 316))
    assert a.read(0, 1000).tolist() == list(range(1, 1001))


def test_batches_are_consecutive_windows_covering_each_epoch_once(datasets: dict[str, TokenDataset]) -> None:
    loader = BatchLoader(datasets["a"], batch_size=4, seq_len=16, seed=0)
    per_epoch = (1000 - 16) // 16
    rows = torch.cat([loader.next_batch() for _ in range(per_epoch // 4)]).numpy()
    assert rows.shape[1] == 17
    assert (np.diff(rows, axis=1) == 1).all()  # every row is a contiguous slice of the data
    starts = rows[:, 0] - 1
    offsets = set(starts % 16)
    assert len(offsets) == 1 and len(set(starts)) == len(starts)  # one offset per epoch, no window twice


def test_deterministic_and_resumable(datasets: dict[str, TokenDataset]) -> None:
    def make(seed: int) -> BatchLoader:
        return BatchLoader(datasets, batch_size=3, seq_len=8, seed=seed, weights={"a": 0.7, "b": 0.3})

    first, second = make(0), make(0)
    assert all(torch.equal(first.next_batch(), second.next_batch()) for _ in range(50))  # well past an epoch
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    expected = [first.next_batch() for _ in range(5)]
    resumed = make(0)
    resumed.load_state_dict(state)
    assert all(torch.equal(e, resumed.next_batch()) for e in expected)
    other = make(1)
    assert not all(torch.equal(first.next_batch(), other.next_batch()) for _ in range(3))
    with pytest.raises(UserError, match="global batch"):
        BatchLoader(datasets, batch_size=4, seq_len=8, weights={"a": 1}).load_state_dict(state)


def test_ranks_split_the_global_batch(datasets: dict[str, TokenDataset]) -> None:
    weights = {"a": 0.5, "b": 0.5}
    single = BatchLoader(datasets, batch_size=4, seq_len=8, seed=2, weights=weights)
    ranks = [BatchLoader(datasets, batch_size=2, seq_len=8, seed=2, rank=r, world_size=2, weights=weights)
             for r in range(2)]
    for _ in range(40):
        assert torch.equal(single.next_batch(), torch.cat([r.next_batch() for r in ranks]))


def test_mixture_weights_and_curriculum(datasets: dict[str, TokenDataset]) -> None:
    loader = BatchLoader(datasets, batch_size=50, seq_len=8, seed=0, weights={"a": 0.8, "b": 0.2})
    from_a = sum(int((loader.next_batch()[:, 0] < 20000).sum()) for _ in range(40))
    assert abs(from_a / 2000 - 0.8) < 3 * (0.8 * 0.2 / 2000) ** 0.5

    def schedule(step: int) -> dict[str, float]:
        return {"a": 1.0} if step < 3 else {"b": 1.0}

    loader = BatchLoader(datasets, batch_size=8, seq_len=8, seed=0, weights=schedule, batches_per_step=2)
    sources = [bool((loader.next_batch()[:, 0] < 20000).all()) for _ in range(10)]
    assert sources == [True] * 6 + [False] * 4  # 3 optimizer steps x 2 micro-batches from "a", then "b"
    loader.set_weights({"a": 1.0, "b": 0.0})
    assert (loader.next_batch()[:, 0] < 20000).all()
    with pytest.raises(UserError, match="unknown dataset"):
        loader.set_weights({"c": 1.0})
    with pytest.raises(UserError, match="positive sum"):
        loader.set_weights({"a": 0.0})


def test_too_short_and_missing(tmp_path: Path) -> None:
    short = TokenDataset.open(write_dataset(tmp_path / "s", np.arange(1, 20), 100))
    with pytest.raises(UserError, match="too short"):
        BatchLoader(short, batch_size=1, seq_len=16)
    with pytest.raises(UserError, match="not a tokenised dataset"):
        TokenDataset.open(tmp_path / "nothing")
    with pytest.raises(UserError, match="no split 'val'"):
        TokenDataset.open(tmp_path / "s", "val")
