"""The ChatML conversation format, defined once: the Jinja template saved with every tokenizer, its Python
twin, message validation, and encoding with a mask of the tokens a model is trained to produce.

Rendered form, one block per message and no default system prompt::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

With ``add_generation_prompt`` the text ends with ``<|im_start|>assistant\\n`` so that the model answers.

Tool calling follows the Qwen2.5 convention (so that ``apply_chat_template(messages, tools=...)`` of transformers
renders the same text). With ``tools`` (OpenAI function definitions), the system turn (the conversation's own
system message, if it opens with one, then a blank line) ends with :data:`TOOLS_PREAMBLE`, the definitions one
JSON object per line inside ``<tools></tools>``, and :data:`TOOLS_FORMAT`. An assistant turn's ``tool_calls``
follow its content (if any) after a newline, one per line::

    <tool_call>\\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\\n</tool_call>

and the results (messages of role ``tool``, in a row) form one user turn, each as
``<tool_response>\\n{content}\\n</tool_response>`` (joined by newlines). Every tag is plain text: the only control
tokens are still ``<|im_start|>`` and ``<|im_end|>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omnilm.errors import UserError

if TYPE_CHECKING:
    from omnilm.tokenizer.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
#: Roles of plain conversations (the Thinker's too).
ROLES = ("system", "user", "assistant")
#: Roles of text conversations that call tools: ``tool`` carries a call's result.
CHAT_ROLES = (*ROLES, "tool")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FORMAT = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
#: OpenAI's rule for function names (which also keeps them free of quotes and tags).
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Whitespace lives only inside string literals: transformers renders with trim_blocks/lstrip_blocks, and
# the text must not depend on those settings. ``tojson`` is transformers' (json.dumps, ensure_ascii=False).
CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ " + _literal(TOOLS_PREAMBLE) + " }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ " + _literal(TOOLS_FORMAT) + " + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}{{ '<|im_start|>user\\n' }}"
    "{% else %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% elif not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{% for tool_call in message['tool_calls'] %}"
    "{% set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": ' + (call['name'] | tojson) + ', \"arguments\": ' }}"
    "{% if call['arguments'] is string %}{{ call['arguments'] }}{% else %}{{ call['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _header(role: str) -> str:
    return f"{IM_START}{role}\n"


def tool_call_function(tool_call: dict[str, Any]) -> dict[str, Any]:
    """``{"name", "arguments"}`` of a call in either form: OpenAI's (``{"type", "function": {...}}``) or HF's."""
    return tool_call.get("function", tool_call)


def format_tool_call(name: str, arguments: Any) -> str:
    """One call as the assistant writes it (``arguments``: an object, or its JSON text used verbatim)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {text}}}\n' \
           f"{TOOL_CALL_CLOSE}"


def _assistant_body(message: dict[str, Any]) -> str:
    body = message.get("content") or ""
    for tool_call in message.get("tool_calls") or ():
        call = tool_call_function(tool_call)
        body += ("\n" if body else "") + format_tool_call(call["name"], call["arguments"])
    return body


def chat_blocks(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
                ) -> list[tuple[str, str]]:
    """The ``(role, text)`` of each ``<|im_start|>{role}\\n{text}<|im_end|>`` block :data:`CHAT_TEMPLATE` renders
    (tool definitions merged into the system block, a run of tool results into one user block)."""
    blocks: list[tuple[str, str]] = []
    rest = list(messages)
    if tools:
        system = f"{rest.pop(0)['content']}\n\n" if rest and rest[0]["role"] == "system" else ""
        listed = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        blocks.append(("system", system + TOOLS_PREAMBLE + listed + TOOLS_FORMAT))
    previous = None
    for message in rest:
        role = message["role"]
        if role == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous == "tool":
                blocks[-1] = ("user", blocks[-1][1] + "\n" + response)
            else:
                blocks.append(("user", response))
        elif role == "assistant":
            blocks.append((role, _assistant_body(message)))
        else:
            blocks.append((role, message["content"]))
        previous = role
    return blocks


def format_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                tools: Sequence[dict[str, Any]] | None = None) -> str:
    """The text :data:`CHAT_TEMPLATE` renders for ``messages`` (which are not validated here)."""
    text = "".join(f"{_header(role)}{body}{IM_END}\n" for role, body in chat_blocks(messages, tools))
    return text + _header("assistant") if add_generation_prompt else text


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """Check OpenAI function definitions (``[{"type": "function", "function": {"name", "description",
    "parameters"}}]``) and return them as a list; UserError naming the first problem."""
    if not isinstance(tools, list) or not tools:
        raise UserError("tools must be a non-empty list of {type: function, function: {name, parameters}} objects")
    names = set()
    for index, tool in enumerate(tools):
        at = f"tool {index}"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise UserError(f'{at}: expected {{"type": "function", "function": {{...}}}}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise UserError(f"{at}: function.name must be 1 to 64 letters, digits, _ or -, got {json.dumps(name)}")
        if name in names:
            raise UserError(f"{at}: a second function named {name!r}")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise UserError(f"{at}: function.description must be a string")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise UserError(f"{at}: function.parameters must be a JSON schema of type object")
    return list(tools)


def _check_tool_calls(tool_calls: Any, at: str) -> None:
    if not isinstance(tool_calls, list) or not tool_calls:
        raise UserError(f"{at}: tool_calls must be a non-empty list")
    for k, tool_call in enumerate(tool_calls):
        call = tool_call_function(tool_call) if isinstance(tool_call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) \
                or not FUNCTION_NAME.fullmatch(call["name"]):
            raise UserError(f"{at}, tool call {k}: expected {{function: {{name, arguments}}}} with a valid name")
        arguments = call.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise UserError(f"{at}, tool call {k}: arguments is not valid JSON ({err})") from err
        if not isinstance(arguments, dict):
            raise UserError(f"{at}, tool call {k}: arguments must be a JSON object")


def validate_messages(messages: Any, where: str = "") -> list[dict[str, Any]]:
    """Check that ``messages`` is a non-empty list of ``{"role", "content"}`` dicts and return it as a list.

    Roles are :data:`CHAT_ROLES`; an assistant message with ``tool_calls`` may have no content. ``where`` (e.g.
    ``"data.jsonl:7"``) prefixes every error so that a bad record can be found.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(messages, list) or not messages:
        kind = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise UserError(f"{prefix}messages must be a non-empty list of {{role, content}} objects, got {kind}")
    for index, message in enumerate(messages):
        at = f"{prefix}message {index}"
        if not isinstance(message, dict):
            raise UserError(f"{at}: expected an object with role and content, got {type(message).__name__}")
        if "role" not in message:
            raise UserError(f"{at}: missing role")
        if message["role"] not in CHAT_ROLES:
            raise UserError(f"{at}: unknown role {message['role']!r} (allowed: {', '.join(CHAT_ROLES)})")
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant":
                raise UserError(f"{at}: only assistant messages carry tool_calls")
            _check_tool_calls(calls, at)
            if message.get("content") in (None, ""):
                continue
        if "content" not in message or message["content"] is None:
            raise UserError(f"{at}: missing content")
        content = message["content"]
        if not isinstance(content, str):
            raise UserError(f"{at}: content must be a string, got {type(content).__name__}")
        if not content:
            raise UserError(f"{at}: empty content")
    return list(messages)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                tools: Sequence[dict[str, Any]] | None = None, prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids of :func:`format_chat` and a mask that is 1 on the tokens the model is trained to produce.

    ``<|im_start|>`` and ``<|im_end|>`` are the control tokens; everything a message brings (its role header and
    content, tool definitions, calls and results) is encoded as plain text, so a special-token string inside a
    message (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``) is text, never a control token: no message can
    forge a turn of another role. For any other content the ids are exactly ``tokenizer.encode(format_chat(...))``,
    since text between two special tokens is encoded on its own either way.

    The mask covers each assistant turn's text (content and tool calls) and its closing ``<|im_end|>`` (so that
    the model learns to stop); headers, other roles (tool results too) and the newline between turns are 0. A
    token that straddles a header and the content (the header's newline merged with newlines that open the
    content) is not inside the content and stays 0.

    ``prefix`` (with ``add_generation_prompt``) is the start of the reply, encoded with the generation prompt's
    header as the whole turn would be (a reply forced to open with ``<tool_call>``).
    """
    messages = validate_messages(list(messages) if isinstance(messages, tuple) else messages)
    if tools:
        tools = validate_tools(list(tools))
    start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if start is None or end is None:
        raise UserError(f"the tokenizer has no {IM_START}/{IM_END} tokens, so it cannot encode conversations")
    plain = tokenizer.plain_backend
    newline = plain.encode("\n", add_special_tokens=False).ids
    ids: list[int] = []
    mask: list[int] = []
    for role, body in chat_blocks(messages, tools):
        header = f"{role}\n"
        trained = role == "assistant"
        encoding = plain.encode(header + body, add_special_tokens=False)
        ids += [start, *encoding.ids, end, *newline]
        mask += [0, *(int(trained and lo >= len(header)) for lo, _ in encoding.offsets), int(trained)]
        mask += [0] * len(newline)
    if add_generation_prompt:
        header = plain.encode("assistant\n" + prefix, add_special_tokens=False).ids
        ids += [start, *header]
        mask += [0] * (1 + len(header))
    elif prefix:
        raise UserError("a reply prefix needs add_generation_prompt")
    return ids, mask
