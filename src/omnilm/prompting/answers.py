"""Reading a reply's final answer, and the majority vote of self-consistency."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from omnilm.data.synth.arithmetic import ANSWER_PATTERN


@dataclass(frozen=True)
class AnswerReader:
    """Reads the answer a reply states: the first group of the *last* match of ``pattern`` (default: the number
    after "answer is", the arithmetic data's ``The answer is N.``), stripped; None when nothing matches."""

    pattern: re.Pattern[str] = ANSWER_PATTERN

    @classmethod
    def from_regex(cls, regex: str) -> AnswerReader:
        """A reader for ``regex``; it needs exactly one capturing group (the answer)."""
        compiled = re.compile(regex, re.IGNORECASE)
        if compiled.groups != 1:
            raise ValueError(f"answer pattern {regex!r}: needs exactly one capturing group, has {compiled.groups}")
        return cls(compiled)

    def __call__(self, reply: str) -> str | None:
        matches = self.pattern.findall(reply)
        return matches[-1].strip() if matches else None


@dataclass(frozen=True)
class Vote:
    """The outcome of a majority vote: the winning answer (None when no reply stated one), how many replies stated
    it, and the index of the first reply that did (the reply to show)."""

    answer: str | None
    count: int
    first: int | None


def majority_vote(answers: Sequence[str | None]) -> Vote:
    """The most frequent stated answer (None entries abstain). Ties go to the answer stated first, so the vote is a
    function of the sequence alone."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(None, 0, None)
    best = max(counts.values())
    first = next(i for i, a in enumerate(answers) if a is not None and counts[a] == best)
    return Vote(answers[first], best, first)
