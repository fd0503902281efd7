"""Repeated random token sequences: pre-training data that teaches a model to copy from its context.

Each document is a random sequence of ordinary tokens followed by the same sequence again, then
``<|endoftext|>``. The first half cannot be predicted at all; the second half is predicted exactly by an
*induction head*, attention that finds the earlier occurrence of the current token and copies the token that
followed it (Olsson et al., *In-context learning and induction heads*, 2022, who use this very data to measure
the mechanism). Reading an answer out of a passage needs the same circuit.

Why a recipe needs it: in a corpus of biographies about a few hundred people, every name and value recurs
across documents, so memorising them always beats copying them, and a small model never forms the circuit (the
demo's pre-trained model predicts the second half of such a sequence no better than the first, and after SFT
on open-book questions it still cannot copy a city's second token from the passage in front of it). Mixed into
pre-training these documents make copying the only way to lower a share of the loss.

The output is a tokenised dataset (the layout of :mod:`omnilm.data.tokenize`) written directly in the ids of a
given tokenizer, so a pre-training stage mixes it with the text's tokens by weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnilm.config import ConfigError
from omnilm.data.tokenize import MAX_SHARD_TOKENS, META, SPLITS, ShardWriter, token_dtype
from omnilm.utils.atomic import write_json_atomic


@dataclass(frozen=True)
class RepeatsConfig:
    """How much and how long."""

    #: Tokens to write, over both splits (documents are added until this many are written).
    tokens: int = 400_000
    #: Length of the random sequence (each document holds it twice), drawn uniformly from [min_len, max_len].
    min_len: int = 8
    max_len: int = 48
    #: Share of the documents in the validation split.
    val_fraction: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 1 or not 1 <= self.min_len <= self.max_len or not 0 <= self.val_fraction < 1:
            raise ConfigError("repeats need tokens ≥ 1, 1 ≤ min_len ≤ max_len and 0 ≤ val_fraction < 1")


def ordinary_ids(tokenizer: Any) -> np.ndarray:
    """The ids of ``tokenizer`` that are not special tokens (those a text can contain)."""
    special = set(tokenizer.backend.get_added_tokens_decoder())
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64)


def repeat_documents(ids: np.ndarray, config: RepeatsConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Documents ``x x`` of random sequences ``x`` over ``ids`` (end-of-text tokens not yet appended), added until
    they and their end-of-text tokens reach ``config.tokens``."""
    docs, written = [], 0
    while written < config.tokens:
        sequence = rng.choice(ids, size=int(rng.integers(config.min_len, config.max_len + 1)))
        docs.append(np.concatenate([sequence, sequence]))
        written += 2 * len(sequence) + 1
    return docs


def write_repeats(tokenizer_dir: str | Path, out: str | Path, config: RepeatsConfig) -> dict[str, Any]:
    """Write the repeats dataset for the tokenizer in ``tokenizer_dir`` into ``out``; returns its ``meta.json``."""
    from omnilm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise ConfigError(f"{tokenizer_dir}: the tokenizer has no end-of-text token to separate documents")
    out = Path(out)
    dtype = token_dtype(tokenizer.vocab_size)
    rng = np.random.default_rng(config.seed)
    writers = {split: ShardWriter(out / split, dtype, MAX_SHARD_TOKENS) for split in SPLITS}
    docs = repeat_documents(ordinary_ids(tokenizer), config, rng)
    to_val = rng.random(len(docs)) < config.val_fraction
    # the first document always trains; with a val_fraction the last one always validates (when it is not the
    # first), so that neither split is empty however few documents there are
    to_val[-1] |= config.val_fraction > 0
    to_val[0] = False
    for doc, val in zip(docs, to_val, strict=True):
        writers["val" if val else "train"].add([*doc.tolist(), tokenizer.eos_id])
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokenizer": str(tokenizer_dir), "seed": config.seed, "val_fraction": config.val_fraction,
            "splits": {split: writer.close() for split, writer in writers.items()},
            "synth": {"kind": "repeats", **asdict(config)}}
    write_json_atomic(out / META, meta)
    return meta
