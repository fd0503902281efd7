"""The copying evaluation against a brute-force per-sequence computation and a hand-written induction head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import small_model
from omnilm.data.synth.repeats import RepeatsConfig, write_repeats
from omnilm.eval.copying import evaluate_copying, repeated_sequences
from omnilm.tokenizer import Tokenizer


class InductionOracle(nn.Module):
    """Predicts the token that followed the latest earlier occurrence of the current one (a uniform guess where
    there is none): an induction head written out by hand."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the evaluation a device to read

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t, token in enumerate(row):
                earlier = [j for j in range(t) if row[j] == token]
                if earlier:
                    logits[b, t, row[earlier[-1] + 1]] = 50.0
        return logits


def test_an_induction_head_copies_every_second_half_token_and_none_of_the_first() -> None:
    rng = np.random.default_rng(0)
    sequences = [rng.choice(np.arange(1, 300), size=n, replace=False) for n in (2, 5, 17, 40)]  # unique tokens
    result = evaluate_copying(InductionOracle(300), sequences, batch_size=3)
    assert result["copy_accuracy"] == 1.0 and result["second_half_loss"] < 1e-6
    assert result["first_half_loss"] == pytest.approx(np.log(300), rel=1e-6)  # uniform: nothing to copy yet
    assert result["sequences"] == 4


def test_batched_losses_equal_each_sequence_scored_alone() -> None:
    model = small_model("llama")
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 320, size=n) for n in (3, 9, 30, 12, 2)]
    first = second = correct = tokens = 0.0
    for sequence in sequences:  # brute force: one unpadded forward pass per sequence
        n = len(sequence)
        ids = torch.as_tensor(np.concatenate([sequence, sequence]))[None]
        with torch.no_grad():
            logits = model(ids[:, :-1])[0]
        nats = F.cross_entropy(logits, ids[0, 1:], reduction="none")
        first += float(nats[:n - 1].sum())
        second += float(nats[n:].sum())
        correct += float((logits[n:].argmax(-1) == ids[0, n + 1:]).sum())
        tokens += n - 1
    result = evaluate_copying(model, sequences, batch_size=2)
    assert result["first_half_loss"] == pytest.approx(first / tokens, rel=1e-5)
    assert result["second_half_loss"] == pytest.approx(second / tokens, rel=1e-5)
    assert result["copy_accuracy"] == pytest.approx(correct / tokens)


def test_sequences_read_back_from_a_repeats_dataset(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(tmp_path / "tokenizer")
    write_repeats(tmp_path / "tokenizer", tmp_path / "repeats", RepeatsConfig(tokens=3000, val_fraction=0.2))
    for split in ("train", "val"):
        sequences = repeated_sequences(tmp_path / "repeats", split)
        flat = np.concatenate([np.concatenate([s, s, [tokenizer.eos_id]]) for s in sequences])
        stored = np.fromfile(tmp_path / "repeats" / split / "shard-00000.bin", dtype=np.uint16)
        assert np.array_equal(flat, stored) and all(8 <= len(s) <= 48 for s in sequences)
