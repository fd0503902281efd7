"""Shared fixtures: a tiny trained tokenizer and saved small models of each family."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import CORPUS, FAMILIES, small_model
from omnilm.model.hf import save_pretrained
from omnilm.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_bpe(CORPUS * 10, vocab_size=320)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model_dir(tmp_path: Path, family: str, tokenizer: Tokenizer) -> Path:
    """A saved small model of ``family`` with the test tokenizer (vocab sizes match)."""
    model = small_model(family, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id)
    return save_pretrained(model, tmp_path / f"{family}-model", tokenizer=tokenizer)
