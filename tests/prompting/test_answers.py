"""Answer extraction and the majority vote."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from omnilm.data.synth.arithmetic import extract_answer
from omnilm.prompting import AnswerReader, majority_vote

answers = st.lists(st.one_of(st.none(), st.sampled_from(["1", "2", "3", "17"])), max_size=12)


@given(answers)
def test_vote_is_a_most_frequent_answer_stated_first(votes: list[str | None]) -> None:
    vote = majority_vote(votes)
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        assert vote.answer is None and vote.count == 0 and vote.first is None
        return
    assert vote.count == max(counts.values()) == counts[vote.answer]
    assert votes[vote.first] == vote.answer and vote.answer not in votes[:vote.first]
    # every other answer as frequent as the winner is stated later
    rivals = [a for a, n in counts.items() if n == vote.count and a != vote.answer]
    assert all(votes.index(a) > vote.first for a in rivals)


def test_vote_examples() -> None:
    assert majority_vote(["4", None, "5", "5", "4"]).answer == "4"  # tie: stated first
    assert majority_vote([None, "9", None, None]).answer == "9"  # no answer abstains
    assert majority_vote([None, None]).answer is None


@given(st.text(max_size=60))
def test_default_reader_agrees_with_the_arithmetic_reward(reply: str) -> None:
    expected = extract_answer(reply)
    assert AnswerReader()(reply) == (None if expected is None else str(expected))


def test_reader_takes_the_last_answer_and_other_patterns() -> None:
    assert AnswerReader()("3 + 4 = 7. The answer is 7. No, the answer is -2.") == "-2"
    assert AnswerReader()("seven") is None
    city = AnswerReader.from_regex(r"born in ([A-Z][a-z]+)")
    assert city("She was born in Lyon and later born in Paris.") == "Paris"
    with pytest.raises(ValueError, match="capturing group"):
        AnswerReader.from_regex(r"answer is \d+")
