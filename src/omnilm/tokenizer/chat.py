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


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of :func:`format_chat` and a mask that is 1 on the tokens the model is trained to produce.

    ``<|im_start|>`` and ``<|im_end|>`` are the control tokens; everything a message brings (its role header and
    content) is encoded as plain text, so a special-token string inside a message (``<|im_start|>``,
    ``<|im_end|>``, ``<|endoftext|>``) is text, never a control token: no message can forge a turn of another
    role. For any other content the ids are exactly ``tokenizer.encode(format_chat(...))``, since text between
    two special tokens is encoded on its own either way.

    The mask covers each assistant content and its closing ``<|im_end|>`` (so that the model learns to stop);
    headers, other roles and the newline between turns are 0. A token that straddles a header and the content
    (the header's newline merged with newlines that open the content) is not inside the content and stays 0.
    """
    messages = validate_messages(list(messages) if isinstance(messages, tuple) else messages)
    start, end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if start is None or end is None:
        raise UserError(f"the tokenizer has no {IM_START}/{IM_END} tokens, so it cannot encode conversations")
    plain = tokenizer.plain_backend
    newline = plain.encode("\n", add_special_tokens=False).ids
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        header = f"{message['role']}\n"
        trained = message["role"] == "assistant"
        encoding = plain.encode(header + message["content"], add_special_tokens=False)
        ids += [start, *encoding.ids, end, *newline]
        mask += [0, *(int(trained and lo >= len(header)) for lo, _ in encoding.offsets), int(trained)]
        mask += [0] * len(newline)
    if add_generation_prompt:
        header = plain.encode("assistant\n", add_special_tokens=False).ids
        ids += [start, *header]
        mask += [0] * (1 + len(header))
    return ids, mask
