"""The prompt template that carries retrieved passages, and open-book records with recall@k."""

from __future__ import annotations

import pytest

from omnilm.rag.index import RagIndex
from omnilm.rag.prompt import render_context, with_context
from omnilm.rag.records import open_book


def test_the_template() -> None:
    assert render_context("Where was Ann born?", ["Ann was born in Rome.", "Bob  was\nborn in Oslo."]) == (
        "Question: Where was Ann born?\nPassages:\n[1] Ann was born in Rome.\n[2] Bob was born in Oslo.\n"
        "Question: Where was Ann born?")
    assert render_context("Where was Ann born?", []) == (
        "Question: Where was Ann born?\nPassages: none\nQuestion: Where was Ann born?")


def test_only_the_last_user_turn_gets_passages() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Where was Ann born?"}]
    out = with_context(messages, ["Ann was born in Rome."])
    assert out[:3] == messages[:3]
    assert out[3] == {"role": "user", "content": render_context("Where was Ann born?", ["Ann was born in Rome."])}
    assert messages[3]["content"] == "Where was Ann born?"  # a copy
    with pytest.raises(ValueError, match="user turn"):
        with_context([{"role": "system", "content": "x"}], ["p"])
    with pytest.raises(ValueError, match="as text"):
        with_context([{"role": "user", "content": [{"type": "text", "text": "x"}]}], ["p"])


def qa(person_id: int, name: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Where was {name} born?"},
                         {"role": "assistant", "content": answer}], "person_id": person_id}


def test_open_book_records_and_recall() -> None:
    index = RagIndex.build([{"text": "Ann Lee was born in Rome.", "person_id": 0},
                            {"text": "Bob Stone was born in Oslo.", "person_id": 1},
                            {"text": "Carl Lee works in Paris.", "person_id": 2}])
    records = [qa(0, "Ann Lee", "Rome"), qa(2, "Lee", "Paris"), qa(9, "Zed Lee", "I don't know.")]
    out, stats = open_book(records, index, 1)
    # "Where was Lee born?": Ann Lee's passage shares both terms, Carl Lee's (the gold one) only "lee".
    assert [r["retrieved_gold"] for r in out] == [True, False, False]
    assert stats["recall_at_k"] == 0.5 and stats["with_gold"] == 2 and stats["mean_passages"] == 1
    assert out[0]["messages"] == [{"role": "user", "content": render_context("Where was Ann Lee born?",
                                                                             ["Ann Lee was born in Rome."])},
                                  records[0]["messages"][1]]
    assert out[2]["person_id"] == 9 and out[2]["messages"][-1]["content"] == "I don't know."
    out, stats = open_book(records, index, 2)
    assert [r["retrieved_gold"] for r in out] == [True, True, False] and stats["recall_at_k"] == 1.0
