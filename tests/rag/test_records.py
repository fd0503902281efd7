"""Open-book training records: a drawn number of passages per record, and records whose gold passage is left out
and whose reply is "I don't know."."""

from __future__ import annotations

import collections

import pytest

from omnilm.data.synth.templates import UNKNOWN_ANSWER
from omnilm.rag.index import RagIndex
from omnilm.rag.prompt import render_context
from omnilm.rag.records import open_book

FIRST = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
LAST = ["Lee", "Stone", "Moss", "Park", "Reed"]
CITIES = ["Rome", "Oslo", "Lima", "Kyiv", "Pune", "Nice", "Bonn", "Graz"]


@pytest.fixture(scope="module")
def people() -> tuple[RagIndex, list[dict]]:
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    passages = [{"text": f"{name} was born in {CITIES[i % len(CITIES)]} and studied law.", "person_id": i}
                for i, name in enumerate(names)]
    records = [{"messages": [{"role": "user", "content": f"Where was {name} born?"},
                             {"role": "assistant", "content": f"{name} was born in {CITIES[i % len(CITIES)]}."}],
                "person_id": i, "answer": f"{name} was born in {CITIES[i % len(CITIES)]}."}
               for i, name in enumerate(names)] * 5
    return RagIndex.build(passages), records


def passage_count(record: dict) -> int:
    content = record["messages"][0]["content"]
    return sum(line.startswith("[") for line in content.splitlines())


def test_each_record_draws_its_number_of_passages(people: tuple[RagIndex, list[dict]]) -> None:
    index, records = people
    out, stats = open_book(records, index, [1, 2, 3], seed=3)
    counts = collections.Counter(passage_count(r) for r in out)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > len(records) / 6
    assert stats["mean_passages"] == pytest.approx(sum(passage_count(r) for r in out) / len(out))
    # Each record shows the prefix of its ranking that a fixed top-k of the same size shows.
    by_k = {k: open_book(records, index, k)[0] for k in (1, 2, 3)}
    for i, record in enumerate(out):
        assert record == by_k[passage_count(record)][i]
    assert open_book(records, index, [1, 2, 3], seed=3)[0] == out
    assert open_book(records, index, [1, 2, 3], seed=4)[0] != out


def test_unanswerable_records_leave_the_gold_passage_out(people: tuple[RagIndex, list[dict]]) -> None:
    index, records = people
    out, stats = open_book(records, index, 2, unanswerable=0.25, seed=1)
    plain, _ = open_book(records, index, 2)
    dropped = [i for i, r in enumerate(out) if r.get("unanswerable")]
    assert stats["unanswerable"] == len(dropped)
    assert 0.15 * len(records) < len(dropped) < 0.35 * len(records)
    assert stats["with_gold"] == len(records) - len(dropped)
    for i, record in enumerate(out):
        if i not in dropped:
            assert record == plain[i]
            continue
        gold = next(p["text"] for p in index.passages if p["person_id"] == record["person_id"])
        question = records[i]["messages"][0]["content"]
        assert passage_count(record) == 2 and gold not in record["messages"][0]["content"]
        # The next passages of the same ranking: the plain top 3 without the gold one.
        ranked = [h.text for h in index.search([question], 3)[0] if h.record["person_id"] != record["person_id"]]
        assert record["messages"][0]["content"] == render_context(question, ranked[:2])
        assert record["messages"][1] == {"role": "assistant", "content": UNKNOWN_ANSWER}
        assert record["answer"] == UNKNOWN_ANSWER and record["retrieved_gold"] is False
    assert records[dropped[0]]["messages"][1]["content"] != UNKNOWN_ANSWER  # the input is not changed


def test_bad_options(people: tuple[RagIndex, list[dict]]) -> None:
    index, records = people
    for top_k in ([], [0, 2], 0):
        with pytest.raises(ValueError, match="top_k"):
            open_book(records, index, top_k)
    with pytest.raises(ValueError, match="unanswerable"):
        open_book(records, index, 2, unanswerable=1.5)


def as_pairs(records: list[dict]) -> list[dict]:
    """Each chat record as a preference pair (its reply chosen, another city rejected); the first in the
    string form the preference loader also accepts."""
    pairs = []
    for n, record in enumerate(records):
        question, reply = record["messages"]
        wrong = reply["content"].rsplit(" ", 1)[0] + " Nowhere."
        pair = {"prompt": [question], "chosen": [reply], "rejected": [{"role": "assistant", "content": wrong}],
                "person_id": record["person_id"]}
        pairs.append(pair | ({"prompt": question["content"], "chosen": reply["content"]} if n == 0 else {}))
    return pairs


def test_preference_pairs_get_the_passages_of_their_question(people: tuple[RagIndex, list[dict]]) -> None:
    index, records = people
    pairs = as_pairs(records)
    chats, chat_stats = open_book(records, index, [1, 2], unanswerable=0.25, seed=2)
    out, stats = open_book(pairs, index, [1, 2], unanswerable=0.25, seed=2)
    assert stats == chat_stats
    for chat, pair, original in zip(chats, out, pairs, strict=True):
        # The same passages and the same draws as the chat records; the reply moves to chosen.
        assert pair["prompt"] == chat["messages"][:1]
        assert pair["chosen"] == chat["messages"][1:]
        assert pair["rejected"] == [{"role": "assistant", "content": original["rejected"][0]["content"]}]
        assert pair["retrieved_gold"] == chat["retrieved_gold"]
        assert pair.get("unanswerable", False) == chat.get("unanswerable", False)
        assert "messages" not in pair
    assert any(p.get("unanswerable") for p in out) and any(not p.get("unanswerable") for p in out)


def test_prompt_completion_records_become_messages(people: tuple[RagIndex, list[dict]]) -> None:
    index, records = people
    flat = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"],
             "person_id": r["person_id"]} for r in records[:8]]
    out, _ = open_book(flat, index, 2)
    expected, _ = open_book([{"messages": r["messages"], "person_id": r["person_id"]} for r in records[:8]],
                            index, 2)
    assert out == expected
