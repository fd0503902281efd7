"""The tool loop: the model replies, each well-formed call it makes is run and its result appended as a ``tool``
turn, and the model replies again, until it answers in text (or ``max_rounds`` calls were made).

Replies are read with the server's parser (:func:`omnilm.serve.tools.parse_reply`), so a call that the loop runs
is exactly one the server would return as ``tool_calls``; a reply that opens ``<tool_call>`` without being a
valid call counts as malformed and is the final (text) answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omnilm.errors import UserError
from omnilm.serve.tools import parse_reply
from omnilm.tokenizer.chat import TOOL_CALL_OPEN, encode_chat
from omnilm.tools.calculator import CALCULATOR_TOOL, run_calculator

#: The tools ``omnilm chat --tools`` and the evaluations can run: name → (definition, function of the arguments'
#: JSON text returning the result text).
TOOLBOX: dict[str, tuple[dict[str, Any], Callable[[str], str]]] = {"calculator": (CALCULATOR_TOOL, run_calculator)}


def toolbox(names: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Callable[[str], str]]]:
    """The definitions and functions of the named tools (UserError for an unknown one)."""
    unknown = [name for name in names if name not in TOOLBOX]
    if unknown or not names:
        raise UserError(f"unknown tool(s) {unknown or names}; available: {', '.join(TOOLBOX)}")
    return [TOOLBOX[n][0] for n in names], {n: TOOLBOX[n][1] for n in names}


@dataclass
class ToolTurn:
    """One conversation's run through the loop."""

    messages: list[dict[str, Any]]  # the conversation, the calls, their results and the final reply
    reply: str = ""  # the final text reply
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (name, arguments JSON, result) per call
    malformed: int = 0  # replies that opened <tool_call> but were no valid call


def run_tool_loop(generate: Callable[[list[list[int]]], list[str]], tokenizer: Any,
                  conversations: Sequence[list[dict[str, Any]]], tools: list[dict[str, Any]],
                  functions: dict[str, Callable[[str], str]], max_rounds: int = 3) -> list[ToolTurn]:
    """Run every conversation through the loop, batched: ``generate`` continues a batch of prompts (token ids)
    with the replies' text."""
    names = frozenset(functions)
    turns = [ToolTurn(list(c)) for c in conversations]
    active = list(range(len(turns)))
    for round_index in range(max_rounds + 1):
        if not active:
            break
        replies = generate([encode_chat(tokenizer, turns[i].messages, add_generation_prompt=True, tools=tools)[0]
                            for i in active])
        still = []
        for i, text in zip(active, replies, strict=True):
            turn = turns[i]
            parsed = parse_reply(text, names) if round_index < max_rounds else None
            if parsed is None:
                turn.malformed += TOOL_CALL_OPEN in text
                turn.reply = text.strip()
                turn.messages.append({"role": "assistant", "content": turn.reply or "..."})
                continue
            content, calls = parsed
            turn.messages.append({"role": "assistant", "content": content, "tool_calls": calls})
            for call in calls:
                name, arguments = call["function"]["name"], call["function"]["arguments"]
                result = functions[name](arguments)
                turn.calls.append((name, arguments, result))
                turn.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result or "(empty)"})
            still.append(i)
        active = still
    return turns

