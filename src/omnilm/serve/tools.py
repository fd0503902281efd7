"""Tool calls over the chat API: the ``tools``/``tool_choice`` of a request, the model's reply read back as
OpenAI ``tool_calls``, and the same streamed as ``delta.tool_calls``.

The model writes calls as the chat template renders them (:mod:`omnilm.tokenizer.chat`, the Qwen2.5 form)::

    optional text\\n<tool_call>\\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\\n</tool_call>

A reply is a call when, after its text, it holds only ``<tool_call>`` blocks (whitespace between them), each a
JSON object with a ``name`` among the request's functions and ``arguments`` a JSON object (or the JSON text of
one). Anything else (broken JSON, an unknown function, an unclosed block, text after a block) is not a call: the
whole reply is returned as ordinary content with the engine's finish reason, never an error.

``tool_choice``:

- ``"auto"`` (the default with tools): the definitions go into the prompt, the model decides;
- ``"none"``: the definitions stay out of the prompt and the reply is plain text;
- ``"required"``: the reply is made to open with ``<tool_call>`` (a prefix written into the prompt after the
  reply's header, as if the model had written it), and with a single function also with its name;
- ``{"type": "function", "function": {"name": N}}``: the reply is made to open with the call of ``N`` up to its
  arguments, which the model writes.

The forced prefix is only a start: generation is not otherwise constrained, so a model may still write something
that is not a call (then returned as text, prefix included).

Streaming: text before a call is streamed as ``delta.content`` as it comes, except a tail that could be the
start of ``<tool_call>`` (and the whitespace before it), held until it is known. From ``<tool_call>`` on the reply
is held until it ends (only a complete reply shows whether it is a well-formed call), then sent as
``delta.tool_calls`` in OpenAI's form: per call, first ``{index, id, type, function: {name, arguments: ""}}``,
then the arguments in pieces; or, if it is no call, as content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from omnilm.errors import UserError
from omnilm.tokenizer.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, validate_tools

#: Characters of a call's arguments per streamed delta.
ARGUMENT_PIECE = 16


class ToolRequestError(ValueError):
    """A request's tools or tool_choice are wrong (the server answers 400 with ``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asks of tools: the definitions rendered into the prompt, the functions a call may name,
    and the text the reply is made to open with."""

    tools: list[dict[str, Any]]
    names: frozenset[str]
    prefix: str = ""


def call_prefix(name: str | None = None) -> str:
    """The forced opening of a reply that calls ``name`` (None: any function)."""
    if name is None:
        return f"{TOOL_CALL_OPEN}\n"
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


def tool_request(body: dict[str, Any], text_model: bool = True) -> ToolRequest | None:
    """The tools of a chat request body, or None when the reply is plain text (no tools, ``tool_choice`` none).

    Raises :class:`ToolRequestError` on a malformed ``tools`` or ``tool_choice``.
    """
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ToolRequestError("tool_choice needs tools", "tool_choice")
        return None
    if not text_model:
        raise ToolRequestError("this model reads media and has no tool-call format; tools need a text model",
                               "tools")
    try:
        tools = validate_tools(tools)
    except UserError as err:
        raise ToolRequestError(str(err), "tools") from err
    names = [tool["function"]["name"] for tool in tools]
    choice = "auto" if choice is None else choice
    if choice == "none":
        return None
    if choice == "auto":
        return ToolRequest(tools, frozenset(names))
    if choice == "required":
        return ToolRequest(tools, frozenset(names), call_prefix(names[0] if len(names) == 1 else None))
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ToolRequestError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                               '"function": {"name": ...}}', "tool_choice")
    if name not in names:
        raise ToolRequestError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                               "tool_choice")
    return ToolRequest(tools, frozenset(names), call_prefix(name))


def assistant_turn(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI assistant message with ``tool_calls`` as the chat template reads it (content: a string, text parts
    joined, or None); the calls themselves are checked by :func:`omnilm.tokenizer.chat.validate_messages`."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise UserError("an assistant message with tool_calls may hold text parts only")
        content = "".join(part["text"] for part in content)
    if content is not None and not isinstance(content, str):
        raise UserError("content must be a string, a list of text parts or null")
    return {"role": "assistant", "content": content or None, "tool_calls": message["tool_calls"]}


def _call(value: Any, names: frozenset[str]) -> dict[str, Any] | None:
    """The OpenAI tool call of the JSON value inside one ``<tool_call>`` block, or None if it is no valid call."""
    if not isinstance(value, dict) or set(value) != {"name", "arguments"} or value["name"] not in names:
        return None
    arguments = value["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _skip_space(text: str, position: int) -> int:
    return len(text) - len(text[position:].lstrip())


def parse_reply(text: str, names: frozenset[str]) -> tuple[str | None, list[dict[str, Any]]] | None:
    """``(content or None, tool calls)`` of a reply that calls tools, or None when it is plain text (no
    ``<tool_call>``, or anything malformed).

    Each block's JSON is decoded where it starts (not cut at the next ``</tool_call>``), so arguments may hold any
    text, tags included.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return None
    decoder = json.JSONDecoder()
    calls, position = [], start
    while position < len(text):
        if not text.startswith(TOOL_CALL_OPEN, position):
            return None
        try:
            value, position = decoder.raw_decode(text, _skip_space(text, position + len(TOOL_CALL_OPEN)))
        except json.JSONDecodeError:
            return None
        call = _call(value, names)
        position = _skip_space(text, position)
        if call is None or not text.startswith(TOOL_CALL_CLOSE, position):
            return None
        calls.append(call)
        position = _skip_space(text, position + len(TOOL_CALL_CLOSE))
    return text[:start].rstrip() or None, calls


def reply_message(request: ToolRequest, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The chat ``message`` and ``finish_reason`` of a whole reply ``text`` (the generated text, after the prefix)."""
    text = request.prefix + text
    parsed = parse_reply(text, request.names)
    if parsed is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = parsed
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def _held(text: str) -> int:
    """Characters at the end of ``text`` that may still open a call: a partial ``<tool_call>`` and the whitespace
    before it."""
    tail = next((k for k in range(min(len(TOOL_CALL_OPEN), len(text)), 0, -1)
                 if TOOL_CALL_OPEN.startswith(text[-k:])), 0)
    head = text[: len(text) - tail]
    return tail + len(head) - len(head.rstrip())


def call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``delta`` objects that stream ``calls``: per call its head (id, name, empty arguments), then the
    arguments in pieces of :data:`ARGUMENT_PIECE` characters."""
    deltas = []
    for index, call in enumerate(calls):
        function = call["function"]
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": function["name"], "arguments": ""}}]})
        arguments = function["arguments"]
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": arguments[k: k + ARGUMENT_PIECE]}}]}
                   for k in range(0, len(arguments), ARGUMENT_PIECE)]
    return deltas


class ToolStream:
    """One streamed choice of a request with tools: which text to send as content now, and the deltas at its end."""

    def __init__(self, request: ToolRequest) -> None:
        self.request = request
        self.text = request.prefix
        self.sent = 0  # characters of text sent as content
        self.calling = bool(request.prefix)  # a <tool_call> has begun: hold everything until the end

    def feed(self, piece: str) -> str | None:
        """Add a generated piece; the content to send now, or None."""
        self.text += piece
        if self.calling:
            return None
        start = self.text.find(TOOL_CALL_OPEN)
        if start >= 0:
            self.calling = True
            limit = len(self.text[:start].rstrip())
        else:
            limit = len(self.text) - _held(self.text)
        out = self.text[self.sent: limit]
        self.sent = max(self.sent, limit)
        return out or None

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The deltas that end the choice (content still held, or its tool calls) and its finish reason."""
        parsed = parse_reply(self.text, self.request.names)
        if parsed is None:
            rest = self.text[self.sent:]
            return ([{"content": rest}] if rest else []), finish_reason
        content, calls = parsed
        rest = (content or "")[self.sent:]
        return ([{"content": rest}] if rest else []) + call_deltas(calls), "tool_calls"
