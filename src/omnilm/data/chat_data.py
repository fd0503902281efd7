"""Chat and preference records from jsonl files, tokenised with the ChatML template and an assistant mask.

Accepted records: ``{"messages": [...]}`` (OpenAI/HF format, with ``tools`` when its turns call tools: they are
rendered into the system turn), ``{"prompt": str, "completion": str}``, and for
preferences ``{"prompt", "chosen", "rejected"}`` where each is a string or a list of messages (the prompt's
messages come first, chosen/rejected hold the assistant reply). A bad record is skipped and listed with its
``file:line`` in the :class:`~omnilm.data.sources.ReadReport`, or fails the run under ``strict``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omnilm.data.sources import ReadReport, expand_inputs, iter_jsonl_records
from omnilm.errors import UserError
from omnilm.tokenizer.chat import encode_chat, validate_messages


@dataclass(frozen=True)
class ChatExample:
    """Token ids of one conversation and the mask of the tokens the loss covers (assistant replies)."""

    ids: list[int]
    mask: list[int]
    where: str


@dataclass(frozen=True)
class PreferenceExample:
    chosen: ChatExample
    rejected: ChatExample


def read_records(paths: Sequence[str], where: Mapping[str, Any] | None = None, strict: bool = False,
                 report: ReadReport | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """Every JSON object in the jsonl ``paths`` whose fields equal ``where`` (all of them), with its location."""
    report = report if report is not None else ReadReport()
    for path in expand_inputs(paths):
        report.files += 1
        for record, location in iter_jsonl_records(path, strict, report):
            report.documents += 1
            if all(record.get(key) == value for key, value in (where or {}).items()):
                yield record, location


def as_messages(value: Any, role: str) -> list[dict[str, Any]]:
    """A string as one ``role`` message; a list of messages as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def record_messages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation of a chat record (``messages`` or ``prompt``/``completion``), validated."""
    if "messages" in record:
        return validate_messages(record["messages"])
    if "prompt" in record and "completion" in record:
        return validate_messages(as_messages(record["prompt"], "user")
                                 + as_messages(record["completion"], "assistant"))
    raise UserError("record has neither messages nor prompt/completion")


def _encode(tokenizer: Any, messages: list[dict[str, Any]], max_len: int, location: str,
            tools: list[dict[str, Any]] | None = None) -> ChatExample:
    ids, mask = encode_chat(tokenizer, messages, tools=tools)
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask):
        raise UserError(f"no assistant tokens within the first {max_len} tokens")
    return ChatExample(ids, mask, location)


def load_chat_examples(paths: Sequence[str], tokenizer: Any, max_len: int, where: Mapping[str, Any] | None = None,
                       strict: bool = False, report: ReadReport | None = None) -> list[ChatExample]:
    """Tokenised conversations, truncated to ``max_len`` tokens; invalid ones skipped (or fatal when strict)."""
    report = report if report is not None else ReadReport()
    examples = []
    for record, location in read_records(paths, where, strict, report):
        try:
            examples.append(_encode(tokenizer, record_messages(record), max_len, location, record.get("tools")))
        except UserError as err:
            report.skip(location, str(err), strict)
    return examples


def load_preference_examples(paths: Sequence[str], tokenizer: Any, max_len: int,
                             where: Mapping[str, Any] | None = None, strict: bool = False,
                             report: ReadReport | None = None) -> list[PreferenceExample]:
    """Tokenised (chosen, rejected) conversation pairs sharing their prompt."""
    report = report if report is not None else ReadReport()
    examples = []
    for record, location in read_records(paths, where, strict, report):
        try:
            if not all(key in record for key in ("prompt", "chosen", "rejected")):
                raise UserError("preference record needs prompt, chosen and rejected")
            prompt = as_messages(record["prompt"], "user")
            pair = [_encode(tokenizer, validate_messages(prompt + as_messages(record[key], "assistant")), max_len,
                            location) for key in ("chosen", "rejected")]
            examples.append(PreferenceExample(*pair))
        except UserError as err:
            report.skip(location, str(err), strict)
    return examples
