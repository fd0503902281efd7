"""The BM25 index: rankings and scores equal a brute-force BM25 written here, save/load, the relevance threshold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.errors import UserError
from omnilm.rag.index import IndexConfig, RagIndex

CORPUS = [
    {"text": "Megan Chang was born in Lake Annettebury and studied mathematics.", "person_id": 0},
    {"text": "Thomas Ortiz works for Cummings LLC in Port Leslie.", "person_id": 1},
    {"text": "Dennis Meyer studied economics; Dennis Meyer was born in Emilyport.", "person_id": 2},
    {"text": "Megan Ortiz was born in Port Leslie, a harbour city, the city of ships.", "person_id": 3},
    {"text": "A city without people: harbour, ships, lighthouse.", "person_id": 4},
]


def brute_force_lucene(docs: list[list[str]], query: list[str], k1: float, b: float) -> list[float]:
    """Lucene's BM25 (the bm25s ``lucene`` method): idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    term score = idf · tf / (tf + k1 · (1 - b + b · |d| / avgdl)), summed over the query's terms."""
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    scores = []
    for doc in docs:
        total = 0.0
        for term in query:
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            if df == 0 or tf == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            total += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(total)
    return scores


def check_against_brute_force(texts: list[str], query: str, k1: float, b: float) -> None:
    index = RagIndex.build([{"text": t} for t in texts], IndexConfig(k1=k1, b=b))
    from omnilm.rag.index import terms

    docs = terms(texts)  # the index's own terms: the test checks the scoring, not the word splitting
    expected = brute_force_lucene(docs, terms([query])[0], k1, b)
    hits = index.search([query], k=len(texts), min_score=-1.0)[0]
    got = {h.position: h.score for h in hits}
    assert len(got) == len(texts)
    for position, score in enumerate(expected):
        assert got[position] == pytest.approx(score, rel=1e-5, abs=1e-6)
    ranked = [h.score for h in hits]
    assert ranked == sorted(ranked, reverse=True)


@pytest.mark.parametrize(("k1", "b"), [(1.5, 0.75), (0.9, 0.4), (2.0, 1.0), (1.2, 0.0)])
def test_scores_equal_a_brute_force_bm25(k1: float, b: float) -> None:
    texts = [r["text"] for r in CORPUS]
    for query in ("Where was Megan Chang born?", "Port Leslie harbour city", "Dennis economics", "ships ships"):
        check_against_brute_force(texts, query, k1, b)


VOCAB = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=12), min_size=2, max_size=8),
       st.lists(st.sampled_from(VOCAB), min_size=1, max_size=4))
def test_any_small_corpus_ranks_as_the_brute_force(docs: list[list[str]], query: list[str]) -> None:
    check_against_brute_force([" ".join(d) for d in docs], " ".join(query), 1.5, 0.75)


def test_the_query_words_are_the_texts_words() -> None:
    from omnilm.rag.index import terms

    assert terms(["Where was Megan Chang born?"])[0] == ["where", "megan", "chang", "born"]
    assert terms([CORPUS[1]["text"]])[0] == ["thomas", "ortiz", "works", "cummings", "llc", "port", "leslie"]


def test_save_and_load_give_the_same_hits(tmp_path: Path) -> None:
    index = RagIndex.build(CORPUS, IndexConfig(k1=1.2, b=0.5, min_score=0.1))
    index.save(tmp_path / "idx")
    loaded = RagIndex.load(tmp_path / "idx")
    assert loaded.config == index.config and loaded.passages == index.passages
    queries = ["Where was Megan Chang born?", "Which company does Thomas Ortiz work for?", "nothing matches here"]
    assert loaded.search(queries, 3) == index.search(queries, 3)
    assert index.search(queries, 3)[0][0].record == CORPUS[0]
    meta = json.loads((tmp_path / "idx" / "rag.json").read_text())
    assert meta["passages"] == len(CORPUS)


def test_threshold_unique_by_and_bad_input(tmp_path: Path) -> None:
    index = RagIndex.build(CORPUS)
    assert index.search(["zebra quokka"], 3) == [[]]  # nothing relevant: no shared term
    scores = [h.score for h in index.search(["Megan Ortiz Port Leslie"], 5)[0]]
    assert len(scores) == 3  # the passages sharing no term are dropped
    strict = index.search(["Megan Ortiz Port Leslie"], 5, min_score=scores[1])[0]
    assert [h.score for h in strict] == scores[:1]
    again = [{"text": "Megan Chang again.", "person_id": 0}]
    one_each = RagIndex.build(CORPUS + again, IndexConfig(unique_by="person_id"))
    assert len(one_each.passages) == len(CORPUS)
    with pytest.raises(UserError, match="no text"):
        RagIndex.build([{"body": "x"}])
    with pytest.raises(UserError, match="method"):
        RagIndex.build(CORPUS, IndexConfig(method="tfidf"))
    with pytest.raises(UserError, match="top-k"):
        index.search(["x"], 0)
    with pytest.raises(UserError, match="not a retrieval index"):
        RagIndex.load(tmp_path)

