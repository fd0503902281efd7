"""Fixtures shared by the training tests: a tokenised toy corpus and a tiny biography chat/preference set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "red", "blue", "big", "small",
         "quickly", "slowly", "and", "then"]


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer and a tokenised toy corpus (random sentences over a small word list)."""
    from omnilm.data.tokenize import tokenize_corpus
    from omnilm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("lm-data")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "." for _ in range(400)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tokenizer_dir = root / "tokenizer"
    train_bpe(docs, vocab_size=300).save(tokenizer_dir)
    tokenize_corpus([str(corpus)], str(tokenizer_dir), root / "tokens", val_fraction=0.05, workers=1, seed=0)
    return {"tokenizer": tokenizer_dir, "tokens": root / "tokens"}


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Biography QA and preference pairs for 12 people, and a tokenizer that knows their text."""
    from omnilm.data.synth.bios import BiosConfig, write_bios
    from omnilm.tokenizer import train_bpe
    from omnilm.tokenizer.chat import format_chat

    root = tmp_path_factory.mktemp("chat")
    write_bios(BiosConfig(people=12, unseen_people=2, bios_per_person=2, seed=0), root / "bios")
    qa = [json.loads(line) for line in (root / "bios" / "qa.jsonl").read_text().splitlines()]
    texts = [format_chat(r["messages"]) for r in qa] * 4
    train_bpe(texts, vocab_size=400).save(root / "tokenizer")
    return {"root": root, "qa": root / "bios" / "qa.jsonl", "prefs": root / "bios" / "prefs.jsonl",
            "tokenizer": root / "tokenizer"}
