"""Streaming detokenization: token ids in, text deltas out, with stop strings.

Text is emitted only once it is final: a trailing incomplete UTF-8 character (decoded as U+FFFD)
and any tail that could still grow into a stop string are held back until later tokens decide.
"""

from __future__ import annotations

from collections.abc import Sequence

from omnilm.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class StreamingDecoder:
    """Decodes one sequence's generated tokens incrementally."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that may not be final yet."""
        hold = len(text) - len(text.rstrip(REPLACEMENT_CHAR))
        body = text[: len(text) - hold]
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(body)), 0, -1):
                if body.endswith(stop[:k]):
                    hold = max(hold, len(text) - len(body) + k)
                    break
        return hold

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (possibly empty). Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        else:
            end = len(text) - self._held_back(text)
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def finish(self) -> str:
        """The text still held back once generation has ended."""
        if self.stopped:
            return ""
        text = self._text()
        delta = text[self.emitted:]
        self.emitted = len(text)
        return delta
