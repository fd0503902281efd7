"""Chat records whose question carries retrieved passages: the open-book training mix and evaluation.

A record's last user turn is searched in the index and rendered with its top-k passages
(:func:`omnilm.rag.prompt.with_context`). ``match_field`` (e.g. ``person_id``) says which passage is the gold
one: the record's value of that field equals the passage's. Retrieval recall@k is the share of records whose
gold passage (when the index holds one) is among their top k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omnilm.rag.index import RagIndex
from omnilm.rag.prompt import last_user_index, with_context


def open_book(records: Sequence[dict[str, Any]], index: RagIndex, top_k: int, match_field: str = "person_id",
              ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each record with its retrieved passages in its last user turn (``retrieved_gold``: whether the gold passage
    is among them), and retrieval statistics: ``recall_at_k`` over the records whose gold passage is in the index
    (``with_gold``), ``mean_passages`` per record."""
    questions = [r["messages"][last_user_index(r["messages"])]["content"] for r in records]
    hits = index.search(questions, top_k)
    indexed = {p.get(match_field) for p in index.passages}
    out, found, with_gold, passages = [], 0, 0, 0
    for record, record_hits in zip(records, hits, strict=True):
        gold = record.get(match_field)
        has_gold = gold is not None and gold in indexed
        retrieved = has_gold and any(h.record.get(match_field) == gold for h in record_hits)
        with_gold += has_gold
        found += retrieved
        passages += len(record_hits)
        messages = with_context(record["messages"][:-1], [h.text for h in record_hits]) + [record["messages"][-1]]
        out.append(record | {"messages": messages, "retrieved_gold": retrieved})
    stats = {"recall_at_k": found / with_gold if with_gold else float("nan"), "with_gold": float(with_gold),
             "mean_passages": passages / len(records) if records else 0.0, "top_k": float(top_k)}
    return out, stats
