"""Repeated random token sequences: every document is ``x x <|endoftext|>`` over ordinary ids, reproducibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.config import ConfigError
from omnilm.data.loader import TokenDataset
from omnilm.data.synth.repeats import RepeatsConfig, ordinary_ids, write_repeats
from omnilm.tokenizer import Tokenizer


def documents(root: Path, split: str) -> list[np.ndarray]:
    """The documents of one split, cut at the offsets the shard files record."""
    dataset = TokenDataset.open(root, split)
    starts = np.concatenate([np.load(p) for p in sorted((root / split).glob("*.docs.npy"))])
    ends = [*starts[1:], len(dataset)]
    return [dataset.read(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(folder)
    return folder


def test_ordinary_ids_leave_out_every_special_token(tokenizer: Tokenizer) -> None:
    ids = set(ordinary_ids(tokenizer).tolist())
    specials = set(tokenizer.backend.get_added_tokens_decoder())
    assert tokenizer.eos_id in specials and not ids & specials
    assert ids | specials == set(range(tokenizer.vocab_size))


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(1, 3000), min_len=st.integers(1, 20), extra=st.integers(0, 30),
       val_fraction=st.sampled_from([0.0, 0.05, 0.5]), seed=st.integers(0, 3))
def test_every_document_is_a_sequence_twice(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path,
                                            tokens: int, min_len: int, extra: int, val_fraction: float,
                                            seed: int) -> None:
    config = RepeatsConfig(tokens=tokens, min_len=min_len, max_len=min_len + extra, val_fraction=val_fraction,
                           seed=seed)
    out = tmp_path_factory.mktemp("repeats")
    meta = write_repeats(tokenizer_dir, out, config)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    ordinary = set(ordinary_ids(tokenizer).tolist())
    written = 0
    assert meta["splits"]["train"]["documents"] > 0
    for split in ("train", "val"):
        if not meta["splits"][split]["documents"]:
            continue
        docs = documents(out, split)
        assert len(docs) == meta["splits"][split]["documents"]
        for doc in docs:
            half = (len(doc) - 1) // 2
            assert doc[-1] == tokenizer.eos_id and len(doc) == 2 * half + 1
            assert min_len <= half <= min_len + extra
            assert np.array_equal(doc[:half], doc[half:-1]) and set(doc[:-1].tolist()) <= ordinary
            written += len(doc)
    docs_in_all = sum(meta["splits"][split]["documents"] for split in ("train", "val"))
    assert (meta["splits"]["val"]["documents"] > 0) == (val_fraction > 0 and docs_in_all > 1)
    # documents are added until the budget is reached, never one more
    assert tokens <= written < tokens + 2 * (min_len + extra) + 1
    again = tmp_path_factory.mktemp("again")
    write_repeats(tokenizer_dir, again, config)
    assert (out / "train" / "shard-00000.bin").read_bytes() == (again / "train" / "shard-00000.bin").read_bytes()


def test_other_seeds_draw_other_sequences(tmp_path: Path, tokenizer_dir: Path) -> None:
    for seed in (0, 1):
        write_repeats(tokenizer_dir, tmp_path / str(seed), RepeatsConfig(tokens=500, seed=seed))
    first, second = (documents(tmp_path / s, "train")[0] for s in ("0", "1"))
    assert not (len(first) == len(second) and np.array_equal(first, second))


def test_bad_settings_are_refused() -> None:
    for bad in ({"tokens": 0}, {"min_len": 0}, {"min_len": 9, "max_len": 8}, {"val_fraction": 1.0}):
        with pytest.raises(ConfigError):
            RepeatsConfig(**bad)


def test_recipe_job_writes_a_dataset_a_stage_can_mix(tmp_path: Path, tokenizer: Tokenizer) -> None:
    from omnilm.recipe.jobs import JOBS

    tokenizer.save(tmp_path / "tokenizer")
    meta = JOBS["synth_repeats"]({"tokenizer": "tokenizer", "tokens": 800, "seed": 2}, tmp_path / "repeats",
                                 tmp_path)
    assert meta["tokenizer"] == str(tmp_path / "tokenizer") and meta["synth"]["seed"] == 2
    assert len(TokenDataset.open(tmp_path / "repeats")) == meta["splits"]["train"]["tokens"] > 0


def test_cli_writes_the_same_dataset(tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from omnilm.cli import main

    assert main(["data", "synth", "repeats", "--tokenizer", str(tokenizer_dir), "--tokens", "700", "--seed", "3",
                 "--out", str(tmp_path / "cli")]) == 0
    assert "train:" in capsys.readouterr().out
    write_repeats(tokenizer_dir, tmp_path / "api", RepeatsConfig(tokens=700, seed=3))
    for name in ("train/shard-00000.bin", "val/shard-00000.bin"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
