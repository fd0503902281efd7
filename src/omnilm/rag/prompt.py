"""The one template that puts retrieved passages into a user turn (chat, serve, training data, evaluation).

The user's question becomes::

    Question: <the user's text>
    Passages:
    [1] <text of the best passage>
    [2] <text of the next one>
    Question: <the user's text>

and with no passage above the index's relevance threshold::

    Question: <the user's text>
    Passages: none
    Question: <the user's text>

The question comes before the passages as well as after them ("query-aware contextualization", Liu et al.,
*Lost in the Middle*, 2023): a decoder reads causally, so only a question it has already seen lets it tell,
while reading a passage, whether the passage is about what is asked. For a small model this is the difference
between reading and not (README, *Retrieval*).

Only the last user turn carries passages; earlier turns stay as the user wrote them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render_context(question: str, passages: Sequence[str]) -> str:
    """The user turn for ``question`` with ``passages`` (best first) in front of it."""
    if not passages:
        return f"Question: {question}\nPassages: none\nQuestion: {question}"
    lines = "\n".join(f"[{i}] {' '.join(text.split())}" for i, text in enumerate(passages, 1))
    return f"Question: {question}\nPassages:\n{lines}\nQuestion: {question}"


def with_context(messages: Sequence[dict[str, Any]], passages: Sequence[str]) -> list[dict[str, Any]]:
    """``messages`` with the last user turn's text rendered with ``passages`` (a copy; the rest unchanged)."""
    out = [dict(m) for m in messages]
    last = last_user_index(out)
    out[last]["content"] = render_context(out[last]["content"], passages)
    return out


def last_user_index(messages: Sequence[dict[str, Any]]) -> int:
    """Where the last user turn is (ValueError when there is none or its content is not text)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            if not isinstance(messages[i].get("content"), str):
                raise ValueError("retrieval needs the last user turn's content as text")
            return i
    raise ValueError("retrieval needs a user turn")
