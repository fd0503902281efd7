"""The one template that puts retrieved passages into a user turn (chat, serve, training data, evaluation).

The user's question becomes::

    Passages:
    [1] <text of the best passage>
    [2] <text of the next one>
    Question: <the user's text>

and with no passage above the index's relevance threshold::

    Passages: none
    Question: <the user's text>

Only the last user turn carries passages; earlier turns stay as the user wrote them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render_context(question: str, passages: Sequence[str]) -> str:
    """The user turn for ``question`` with ``passages`` (best first) in front of it."""
    if not passages:
        return f"Passages: none\nQuestion: {question}"
    lines = "\n".join(f"[{i}] {' '.join(text.split())}" for i, text in enumerate(passages, 1))
    return f"Passages:\n{lines}\nQuestion: {question}"


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
