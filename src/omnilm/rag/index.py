"""A BM25 index over passages (the ``bm25s`` library), saved as a folder and searched with scores.

Folder layout (``omnilm rag index --out DIR``):

``bm25/``           the bm25s index (its own ``save``/``load`` files)
``passages.jsonl``  the indexed records in index order (``text`` plus whatever fields they carried)
``rag.json``        the :class:`IndexConfig` it was built with and the passage count
``dense.npy``       with ``dense_model``: the passages' embeddings (float32, L2-normalised)

Passages and queries are split into terms by bm25s (lower case, words of two or more characters, English stop
words removed). A hit scoring at most ``min_score`` is not relevant: a search may return fewer than ``k``
passages, or none ("nothing relevant"). With ``dense_model`` (a model folder) passages and queries are also
embedded with that model's mean-pooled hidden states (:func:`omnilm.infer.embed.embed_texts`) and searches rank
by cosine similarity instead (``min_score`` then applies to the cosine).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnilm.errors import UserError
from omnilm.utils.atomic import write_json_atomic

CONFIG_FILE = "rag.json"
PASSAGES_FILE = "passages.jsonl"
DENSE_FILE = "dense.npy"
BM25_DIR = "bm25"
METHODS = ("robertson", "atire", "bm25l", "bm25+", "lucene")


@dataclass
class IndexConfig:
    """How an index is built (``omnilm rag index`` flags of the same names)."""

    #: The record field that is indexed and shown as the passage.
    text_field: str = "text"
    #: Keep only the first record for each value of this field (e.g. ``person_id``: one biography per person).
    unique_by: str | None = None
    #: bm25s scoring variant (robertson, atire, bm25l, bm25+, lucene).
    method: str = "lucene"
    #: Term-frequency saturation.
    k1: float = 1.5
    #: Length normalisation (0: none, 1: full).
    b: float = 0.75
    #: Relevance threshold: hits scoring at most this are dropped (0 drops passages sharing no term with the query).
    min_score: float = 0.0
    #: A model folder whose mean-pooled hidden states embed passages and queries: dense retrieval (None: BM25).
    dense_model: str | None = None


@dataclass(frozen=True)
class Hit:
    """One retrieved passage: its position in the index, its BM25 score and its record."""

    position: int
    score: float
    record: dict[str, Any]

    @property
    def text(self) -> str:
        return self.record["text"]


def terms(texts: Sequence[str]) -> list[list[str]]:
    """The BM25 terms of each text (bm25s' tokenizer: lower case, 2+ character words, English stop words out)."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class RagIndex:
    """Passages and their BM25 index."""

    def __init__(self, retriever: Any, passages: list[dict[str, Any]], config: IndexConfig,
                 dense: Any = None) -> None:
        self.retriever, self.passages, self.config = retriever, passages, config
        #: The passages' embeddings (N, d) with ``config.dense_model``, else None.
        self.dense = dense
        self._encoder: tuple[Any, Any] | None = None

    def embed(self, texts: Sequence[str]) -> Any:
        """Embeddings of ``texts`` by the index's dense model (loaded once)."""
        import torch

        from omnilm.infer.embed import embed_texts
        from omnilm.model.hf import load_pretrained
        from omnilm.tokenizer import Tokenizer

        if self._encoder is None:
            folder = self.config.dense_model
            self._encoder = (load_pretrained(folder, dtype=torch.float32).eval(), Tokenizer.from_dir(folder))
        return embed_texts(*self._encoder, texts)

    @classmethod
    def build(cls, records: Iterable[dict[str, Any]], config: IndexConfig | None = None) -> RagIndex:
        """Index ``records`` (each needs ``config.text_field``); the passage keeps the record's other fields."""
        import bm25s

        config = config or IndexConfig()
        if config.method not in METHODS:
            raise UserError(f"unknown BM25 method {config.method!r} (known: {', '.join(METHODS)})")
        passages, seen = [], set()
        for record in records:
            text = record.get(config.text_field)
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"a record has no text in field {config.text_field!r}: {str(record)[:120]}")
            if config.unique_by is not None:
                key = json.dumps(record.get(config.unique_by))
                if key in seen:
                    continue
                seen.add(key)
            passages.append({k: v for k, v in record.items() if k != config.text_field} | {"text": text})
        if not passages:
            raise UserError("nothing to index: no records")
        retriever = bm25s.BM25(method=config.method, k1=config.k1, b=config.b)
        retriever.index(terms([p["text"] for p in passages]), show_progress=False)
        index = cls(retriever, passages, config)
        if config.dense_model is not None:
            index.dense = index.embed([p["text"] for p in passages])
        return index

    def save(self, out: str | Path) -> Path:
        """Write the index folder (see the module docstring)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(out / BM25_DIR), show_progress=False)
        with open(out / PASSAGES_FILE, "w", encoding="utf-8") as f:
            for passage in self.passages:
                f.write(json.dumps(passage, ensure_ascii=False) + "\n")
        if self.dense is not None:
            import numpy as np

            np.save(out / DENSE_FILE, self.dense)
        write_json_atomic(out / CONFIG_FILE, {"config": asdict(self.config), "passages": len(self.passages)})
        return out

    @classmethod
    def load(cls, folder: str | Path) -> RagIndex:
        """An index folder written by :meth:`save`."""
        import bm25s

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise UserError(f"{folder} is not a retrieval index (no {CONFIG_FILE}; build one with omnilm rag index)")
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        with open(folder / PASSAGES_FILE, encoding="utf-8") as f:
            passages = [json.loads(line) for line in f if line.strip()]
        retriever = bm25s.BM25.load(str(folder / BM25_DIR), show_progress=False, verbosity=0)
        dense = None
        if (folder / DENSE_FILE).is_file():
            import numpy as np

            dense = np.load(folder / DENSE_FILE)
        return cls(retriever, passages, IndexConfig(**meta["config"]), dense)

    def search(self, queries: Sequence[str], k: int, min_score: float | None = None) -> list[list[Hit]]:
        """The best ``k`` relevant passages per query, best first (ties in index order)."""
        if k < 1:
            raise UserError(f"top-k must be at least 1, got {k}")
        threshold = self.config.min_score if min_score is None else min_score
        k = min(k, len(self.passages))
        if not queries:
            return []
        if self.dense is not None:
            import numpy as np

            similarity = self.embed(queries) @ self.dense.T
            positions = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(similarity, positions, axis=1)
        else:
            positions, scores = self.retriever.retrieve(terms(queries), k=k, show_progress=False, n_threads=1)
        return [[Hit(int(p), float(s), self.passages[int(p)]) for p, s in zip(row_p, row_s, strict=True)
                 if float(s) > threshold] for row_p, row_s in zip(positions, scores, strict=True)]
