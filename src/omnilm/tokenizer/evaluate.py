"""How well a tokenizer fits a corpus: compression, vocabulary use and lossless round trips."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omnilm.tokenizer.tokenizer import Tokenizer

MAX_LISTED_FAILURES = 5  # round-trip failures beyond this are counted, not listed
FAILURE_PREVIEW_CHARS = 80


def _preview(text: str) -> str:
    return text if len(text) <= FAILURE_PREVIEW_CHARS else text[:FAILURE_PREVIEW_CHARS] + "..."


def evaluate_tokenizer(tokenizer: Tokenizer, texts: Iterable[str], batch_size: int = 256) -> dict[str, Any]:
    """Metrics of ``tokenizer`` on ``texts``.

    Returns ``documents``, ``bytes`` (UTF-8), ``tokens``, ``bytes_per_token``, ``distinct_tokens``,
    ``vocab_size``, ``vocab_use`` (distinct ids used / vocab size), ``round_trip_failures`` (documents
    whose ``decode(encode(text))`` differs from the text) and ``failure_examples`` (the first few of them,
    each with the document index and shortened original and decoded text).
    """
    documents = n_bytes = n_tokens = failures = 0
    used: set[int] = set()
    examples: list[dict[str, Any]] = []

    def consume(batch: list[str]) -> None:
        nonlocal documents, n_bytes, n_tokens, failures
        for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(ids)
            used.update(ids)
            decoded = tokenizer.decode(ids)
            if decoded != text:
                failures += 1
                if len(examples) < MAX_LISTED_FAILURES:
                    examples.append({"document": documents, "text": _preview(text), "decoded": _preview(decoded)})
            documents += 1

    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            consume(batch)
            batch = []
    if batch:
        consume(batch)
    vocab_size = tokenizer.vocab_size
    return {
        "documents": documents,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
        "distinct_tokens": len(used),
        "vocab_size": vocab_size,
        "vocab_use": len(used) / vocab_size if vocab_size else 0.0,
        "round_trip_failures": failures,
        "failure_examples": examples,
    }
