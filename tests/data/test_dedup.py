import random

import numpy as np
import pytest

from omnilm.data.dedup import ExactDeduper, NearDeduper, exact_key, shingle_hashes

VOCAB = [f"word{i}" for i in range(3000)]


def random_doc(rng: random.Random, words: int = 200) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(words)]


def test_exact_key_ignores_case_whitespace_and_unicode_form():
    assert exact_key("Hello  World\n") == exact_key("hello world")
    assert exact_key("cafe\u0301") == exact_key("café")
    assert exact_key("hello world") != exact_key("hello, world")


def test_exact_deduper_keeps_the_first_and_names_it():
    dedup = ExactDeduper()
    assert dedup.check("The cat sat.", "a.jsonl:1") is None
    assert dedup.check("the  CAT sat.", "a.jsonl:2") == "a.jsonl:1"
    assert dedup.check("The dog sat.", "a.jsonl:3") is None
    assert dedup.check("THE CAT SAT.", "b.txt:1") == "a.jsonl:1"


def test_shingles_are_deterministic_and_cover_short_texts():
    assert np.array_equal(shingle_hashes("a b c d e f", 5), shingle_hashes("A b, c d e f!", 5))
    assert len(shingle_hashes("a b c d e f", 5)) == 2
    assert len(shingle_hashes("only three words", 5)) == 1
    assert len(shingle_hashes(" ... ", 5)) == 0


def test_near_duplicates_are_removed_and_distinct_documents_kept():
    rng = random.Random(0)
    dedup = NearDeduper(threshold=0.8, num_perm=128, shingle_size=5)
    original = random_doc(rng)
    assert dedup.check(" ".join(original), "x:1") is None
    edited = list(original)
    for position in (20, 100, 180):
        edited[position] = "changed"
    assert dedup.check(" ".join(edited), "x:2") == "x:1"
    for i in range(3, 23):
        assert dedup.check(" ".join(random_doc(rng)), f"x:{i}") is None


def test_the_earliest_kept_document_is_reported():
    rng = random.Random(1)
    base = random_doc(rng)
    dedup = NearDeduper()
    assert dedup.check(" ".join(base), "first:1") is None
    assert dedup.check(" ".join(random_doc(rng)), "other:1") is None
    assert dedup.check(" ".join(base[:-1] + ["tail"]), "later:1") == "first:1"


def test_documents_sharing_only_half_their_text_are_kept():
    rng = random.Random(2)
    first, second = random_doc(rng), random_doc(rng)
    dedup = NearDeduper(threshold=0.8)
    assert dedup.check(" ".join(first), "a:1") is None
    assert dedup.check(" ".join(first[:100] + second[100:]), "a:2") is None


def test_a_text_without_words_is_never_a_duplicate():
    dedup = NearDeduper()
    assert dedup.check("!!!", "a:1") is None
    assert dedup.check("!!!", "a:2") is None


@pytest.mark.parametrize("kwargs", [dict(threshold=0), dict(threshold=1.5), dict(shingle_size=0), dict(num_perm=1)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        NearDeduper(**kwargs)


def test_recall_on_many_lightly_edited_copies():
    rng = random.Random(3)
    originals = [random_doc(rng) for _ in range(30)]
    dedup = NearDeduper()
    for i, words in enumerate(originals):
        assert dedup.check(" ".join(words), f"orig:{i}") is None
    found = 0
    for i, words in enumerate(originals):
        edited = list(words)
        for position in rng.sample(range(len(words)), 3):
            edited[position] = rng.choice(VOCAB)
        found += dedup.check(" ".join(edited), f"copy:{i}") == f"orig:{i}"
    assert found >= 28  # estimated Jaccard around 0.86 against a threshold of 0.8: rare misses are expected
