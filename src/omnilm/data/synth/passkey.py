"""Passkey training documents: the filler of the passkey-retrieval test with a key inside and the answer at the end.

A model trained on some of these at a short length learns to retrieve; the context-extension recipe then asks
whether it still can at lengths it never saw. Sizes are counted in filler sentences (no tokenizer is needed yet
when data is prepared); the key sits at a uniformly drawn depth. Records: ``{"text", "key", "sentences"}``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.config import ConfigError
from omnilm.data.synth.io import write_jsonl


@dataclass(frozen=True)
class PasskeyConfig:
    """How many documents and how long."""

    #: Training documents.
    docs: int = 2000
    #: Filler sentences per document, drawn uniformly from [min_sentences, max_sentences].
    min_sentences: int = 0
    max_sentences: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.docs < 1 or not 0 <= self.min_sentences <= self.max_sentences:
            raise ConfigError("passkey data needs docs ≥ 1 and 0 ≤ min_sentences ≤ max_sentences")


def passkey_text(sentences: int, depth: float, key: str) -> str:
    """A passkey document of ``sentences`` filler sentences, the key after ``depth`` of them, and its answer."""
    from omnilm.eval.long_context import KINDS

    filler_text, needle, question = KINDS["passkey"]
    units = re.split(r"(?<=\.)\s+", filler_text)
    filler = [units[i % len(units)] for i in range(sentences)]
    cut = round(depth * sentences)
    body = (" ".join(filler[:cut]) + needle.format(key=key) + " " + " ".join(filler[cut:])).strip()
    return f"{body}{question} {key}."


def write_passkey(config: PasskeyConfig, out: str | Path) -> dict[str, Any]:
    """``train.jsonl`` of passkey documents in ``out``."""
    rng = random.Random(config.seed)
    records = []
    for _ in range(config.docs):
        sentences = rng.randint(config.min_sentences, config.max_sentences)
        key = str(rng.randint(10000, 99999))
        records.append({"text": passkey_text(sentences, rng.random(), key), "key": key, "sentences": sentences})
    write_jsonl(Path(out) / "train.jsonl", records)
    return {"docs": len(records)}
