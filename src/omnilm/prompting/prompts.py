"""Prompts as chat messages: demonstrations (question → reply turns) before the question, and the zero-shot
chain-of-thought trigger (Kojima et al., 2022) after it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Appended to a question to ask for the reasoning before the answer. The arithmetic recipe's data pairs it with
#: worked answers, so there the model learns what it means from the data.
COT_TRIGGER = "Let's think step by step."


@dataclass(frozen=True)
class Demonstration:
    """One worked example: a question and the reply to show for it."""

    question: str
    reply: str


def ask(question: str, trigger: str | None = None) -> str:
    """The user turn: ``question``, then ``trigger`` (if any) after a space."""
    return f"{question} {trigger}" if trigger else question


def chat_messages(question: str, demonstrations: Sequence[Demonstration] = (), trigger: str | None = None,
                  system: str | None = None) -> list[dict[str, str]]:
    """Messages for a chat model: the demonstrations as earlier user/assistant turns (each question with the same
    ``trigger`` as the real one, so the examples look like the question that follows), then the question."""
    messages = [{"role": "system", "content": system}] if system else []
    for demo in demonstrations:
        messages += [{"role": "user", "content": ask(demo.question, trigger)},
                     {"role": "assistant", "content": demo.reply}]
    return messages + [{"role": "user", "content": ask(question, trigger)}]


def text_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The same turns for a model without a chat format, in the arithmetic data's plain-text form: every user turn
    ``Question: ...`` and every assistant turn ``Answer: ...`` on the next line, examples separated by a blank
    line; ends with ``Answer:`` for the model to continue (system messages are dropped)."""
    parts = []
    for message in messages:
        if message["role"] == "user":
            parts.append(f"Question: {message['content']}\nAnswer:")
        elif message["role"] == "assistant":
            parts[-1] += f" {message['content']}\n\n"
    return "".join(parts)
