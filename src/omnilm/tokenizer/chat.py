"""The ChatML conversation format, defined once: the Jinja template saved with every tokenizer, its Python
twin, message validation, and encoding with a mask of the tokens a model is trained to produce.

Rendered form, one block per message and no default system prompt::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

With ``add_generation_prompt`` the text ends with ``<|im_start|>assistant\\n`` so that the model answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omnilm.errors import UserError

if TYPE_CHECKING:
    from omnilm.tokenizer.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

# Whitespace lives only inside string literals: transformers renders with trim_blocks/lstrip_blocks, and
# the text must not depend on those settings.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _header(role: str) -> str:
    return f"{IM_START}{role}\n"


def format_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The text :data:`CHAT_TEMPLATE` renders for ``messages`` (which are not validated here)."""
    text = "".join(f"{_header(m['role'])}{m['content']}{IM_END}\n" for m in messages)
    return text + _header("assistant") if add_generation_prompt else text


def validate_messages(messages: Any, where: str = "") -> list[dict[str, Any]]:
    """Check that ``messages`` is a non-empty list of ``{"role", "content"}`` dicts and return it as a list.

    ``where`` (e.g. ``"data.jsonl:7"``) prefixes every error so that a bad record can be found.
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
        if message["role"] not in ROLES:
            raise UserError(f"{at}: unknown role {message['role']!r} (allowed: {', '.join(ROLES)})")
        if "content" not in message or message["content"] is None:
            raise UserError(f"{at}: missing content")
        content = message["content"]
        if not isinstance(content, str):
            raise UserError(f"{at}: content must be a string, got {type(content).__name__}")
        if not content:
            raise UserError(f"{at}: empty content")
    return list(messages)


def _trained_spans(messages: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """Character spans of each assistant message's content plus its closing ``<|im_end|>``."""
    spans, position = [], 0
    for message in messages:
        start = position + len(_header(message["role"]))
        end = start + len(message["content"]) + len(IM_END)
        if message["role"] == "assistant":
            spans.append((start, end))
        position = end + 1  # the newline after <|im_end|>
    return spans


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of :func:`format_chat` and a mask that is 1 on the tokens the model is trained to produce.

    Those are the tokens of each assistant content and its closing ``<|im_end|>`` (so that the model learns
    to stop); headers, other roles and the newline between turns are 0. The whole text is encoded at once,
    so the ids are exactly ``tokenizer.encode(format_chat(...))``, and the mask is read off token offsets.
    A token that straddles a header and the content (the header's newline merged with newlines that open
    the content) is not inside the content and stays 0.
    """
    messages = validate_messages(list(messages) if isinstance(messages, tuple) else messages)
    text = format_chat(messages, add_generation_prompt)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    spans = _trained_spans(messages)
    mask = []
    for start, end in encoding.offsets:
        mask.append(int(any(lo <= start and end <= hi for lo, hi in spans)))
    return list(encoding.ids), mask
