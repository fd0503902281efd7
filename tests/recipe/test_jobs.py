"""Recipe jobs run directly: the open-book job on chat records and on preference pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnilm.config import ConfigError
from omnilm.recipe.jobs import JOBS

NAMES = ["Ann Lee", "Bob Stone", "Cleo Moss", "Dan Park", "Eve Reed", "Finn Hale"]
CITIES = ["Rome", "Oslo", "Lima", "Kyiv", "Pune", "Nice"]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "passages.jsonl", [{"text": f"{n} was born in {c}.", "person_id": i}
                                              for i, (n, c) in enumerate(zip(NAMES, CITIES, strict=True))])
    # Person 6 has no passage: a question about someone the index does not know.
    people = [*zip(NAMES, CITIES, strict=True), ("Gia Vu", "Bonn")]
    chats = [{"messages": [{"role": "user", "content": f"Where was {n} born?"},
                           {"role": "assistant", "content": c}], "person_id": i} for i, (n, c) in enumerate(people)]
    pairs = [{"prompt": c["messages"][:1], "chosen": c["messages"][1:],
              "rejected": [{"role": "assistant", "content": "Atlantis"}], "person_id": c["person_id"]} for c in chats]
    write_jsonl(tmp_path / "qa.jsonl", chats)
    write_jsonl(tmp_path / "prefs.jsonl", pairs)
    JOBS["rag_index"]({"data": "passages.jsonl"}, tmp_path / "index", tmp_path)
    return tmp_path


def test_chat_records_and_preference_pairs_get_the_same_passages(root: Path) -> None:
    JOBS["rag_qa"]({"data": "qa.jsonl", "index": "index", "top_k": 2}, root / "chat", root)
    stats = JOBS["rag_qa"]({"data": "prefs.jsonl", "index": "index", "top_k": 2}, root / "pairs", root)
    chats, pairs = read_jsonl(root / "chat" / "qa.jsonl"), read_jsonl(root / "pairs" / "prefs.jsonl")
    assert not (root / "pairs" / "qa.jsonl").exists() and not (root / "chat" / "prefs.jsonl").exists()
    assert stats["records"] == len(pairs) == len(chats) == 7 and stats["recall_at_k"] == 1.0
    for chat, pair in zip(chats, pairs, strict=True):
        assert pair["prompt"] == chat["messages"][:1] and pair["chosen"] == chat["messages"][1:]
        assert pair["rejected"] == [{"role": "assistant", "content": "Atlantis"}]
    gold = pairs[2]["prompt"][0]["content"]
    assert "Cleo Moss was born in Lima." in gold and gold.count("\n[") == 2


def test_a_mix_of_chats_and_pairs_is_refused(root: Path) -> None:
    with pytest.raises(ConfigError, match="mixes 7 preference pairs with 7 chat records"):
        JOBS["rag_qa"]({"data": ["qa.jsonl", "prefs.jsonl"], "index": "index", "top_k": 1}, root / "mixed", root)
