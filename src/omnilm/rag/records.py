"""Chat records whose question carries retrieved passages: the open-book training mix and evaluation.

A record is a chat (``messages``, ending with the reference reply) or a preference pair (``prompt``, ``chosen``,
``rejected``). Its last user turn is searched in the index and rendered with its top-k passages
(:func:`omnilm.rag.prompt.with_context`). ``match_field`` (e.g. ``person_id``) says which passage is the gold
one: the record's value of that field equals the passage's. Retrieval recall@k is the share of records whose
gold passage (when the index holds one) is among their top k.

Two options make a training mix that teaches more than reading one layout:

- ``top_k`` as a list: each record shows as many passages as a seeded draw from the list says, so that a model
  reads whatever number of passages a user's ``--top-k`` puts in front of it, not only the number it was trained
  on;
- ``unanswerable``: that share of the records whose gold passage is indexed show the next passages instead of it,
  and their reply becomes ``"I don't know."``: the question is about someone no passage is about, the case of
  a person who does not exist, on as many different names as there are records.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from omnilm.data.chat_data import as_messages, record_messages
from omnilm.data.synth.templates import UNKNOWN_ANSWER
from omnilm.rag.index import RagIndex
from omnilm.rag.prompt import last_user_index, with_context


def open_book(records: Sequence[dict[str, Any]], index: RagIndex, top_k: int | Sequence[int],
              match_field: str = "person_id", unanswerable: float = 0.0, seed: int = 0,
              ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each record with its retrieved passages in its last user turn (``retrieved_gold``: whether the gold passage
    is among them; ``unanswerable``: whether it was left out on purpose), and retrieval statistics:
    ``recall_at_k`` over the records whose gold passage is in the index and was not left out (``with_gold``),
    ``mean_passages`` per record, ``unanswerable`` records.

    ``top_k``: passages per record, or a list to draw each record's number from; ``unanswerable``: the share of
    records with an indexed gold passage that get the best passages other than it and the reply
    :data:`~omnilm.data.synth.templates.UNKNOWN_ANSWER`; ``seed`` makes both draws repeatable."""
    choices = [top_k] if isinstance(top_k, int) else [int(k) for k in top_k]
    if not choices or min(choices) < 1:
        raise ValueError(f"top_k must be a positive number of passages or a list of them, got {top_k!r}")
    if not 0.0 <= unanswerable <= 1.0:
        raise ValueError(f"unanswerable must be a share between 0 and 1, got {unanswerable}")
    rng = random.Random(seed)
    records = [_normalised(r) for r in records]
    contexts = [r["prompt"] if "chosen" in r else r["messages"][:-1] for r in records]
    questions = [c[last_user_index(c)]["content"] for c in contexts]
    # One passage more than the most shown, for the records whose gold passage is left out.
    hits = index.search(questions, max(choices) + (unanswerable > 0))
    indexed = {p.get(match_field) for p in index.passages}
    out, found, with_gold, passages, left_out = [], 0, 0, 0, 0
    for record, context, record_hits in zip(records, contexts, hits, strict=True):
        k, drop = rng.choice(choices), rng.random() < unanswerable
        gold = record.get(match_field)
        has_gold = gold is not None and gold in indexed
        if has_gold and drop:
            shown = [h for h in record_hits if h.record.get(match_field) != gold][:k]
            record = _unanswerable(record) | {"retrieved_gold": False, "unanswerable": True}
            left_out += 1
        else:
            shown = record_hits[:k]
            retrieved = has_gold and any(h.record.get(match_field) == gold for h in shown)
            with_gold += has_gold
            found += retrieved
            record = record | {"retrieved_gold": retrieved}
        passages += len(shown)
        rendered = with_context(context, [h.text for h in shown])
        out.append(record | ({"prompt": rendered} if "chosen" in record
                             else {"messages": rendered + record["messages"][-1:]}))
    stats = {"recall_at_k": found / with_gold if with_gold else float("nan"), "with_gold": float(with_gold),
             "mean_passages": passages / len(records) if records else 0.0, "top_k": float(max(choices)),
             "unanswerable": float(left_out)}
    return out, stats


def _normalised(record: dict[str, Any]) -> dict[str, Any]:
    """A preference pair with lists of messages, or a chat record with ``messages`` (from ``prompt``/``completion``
    too)."""
    if "chosen" in record:
        return record | {key: as_messages(record[key], role) for key, role in
                         (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant"))}
    messages = record_messages(record)
    return {k: v for k, v in record.items() if k not in ("prompt", "completion")} | {"messages": messages}


def _unanswerable(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with "I don't know." as its reply (a preference pair's chosen one; its rejected one stays)."""
    reply = {"role": "assistant", "content": UNKNOWN_ANSWER}
    if "chosen" in record:
        return record | {"chosen": [reply]}
    return record | {"answer": UNKNOWN_ANSWER, "messages": [*record["messages"][:-1], record["messages"][-1] | reply]}
