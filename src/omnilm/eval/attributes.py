"""Attribute recall on biography sentences: does the model complete "... was born in" with the right city?

Each eval record is a sentence with the attribute value's character span marked. The prompt is the text up to
the value (without the space before it, which belongs to the value's first token in byte-level BPE), the
target is the value plus the character that follows it (the sentence's period), so that "Paris" does not
count as a correct "Parisville".

Accuracy is computed teacher-forced in one forward pass: greedy decoding produces the target exactly when the
argmax at every target position is the target token, so this equals "greedy completion == truth" without
running generation. The attribute loss is the mean cross-entropy over the value's tokens only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttributeExample:
    """One completion probe: ``prompt_ids`` then ``target_ids`` (the first ``value_len`` of them are the value)."""

    person_id: int | None
    attribute: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    value_len: int


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a jsonl file; a malformed line is an error naming file and line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from err
    return records


def build_examples(records: Iterable[dict[str, Any]], tokenizer: Any) -> list[AttributeExample]:
    """Tokenise eval records (``text``, ``value_start``, ``value_end``, ``attribute``, ``person_id``)."""
    examples = []
    for record in records:
        text, start, end = record["text"], record["value_start"], record["value_end"]
        prompt = text[:start].rstrip()
        stop = end + 1 if end < len(text) else end  # include the terminator after the value
        prompt_ids = tokenizer.encode(prompt)
        full_ids = tokenizer.encode(text[:stop])
        value_ids = tokenizer.encode(text[:end])
        if full_ids[: len(prompt_ids)] != prompt_ids or full_ids[: len(value_ids)] != value_ids:
            # The token boundary does not fall at the value's start; fall back to encoding the pieces apart.
            target_ids = tokenizer.encode(text[len(prompt):stop])
            value_len = len(tokenizer.encode(text[len(prompt):end]))
        else:
            target_ids = full_ids[len(prompt_ids):]
            value_len = len(value_ids) - len(prompt_ids)
        examples.append(AttributeExample(record.get("person_id"), record["attribute"], tuple(prompt_ids),
                                         tuple(target_ids), max(1, value_len)))
    return examples


@torch.no_grad()
def target_log_probs(model: nn.Module, examples: Sequence[AttributeExample], pad_id: int,
                     batch_size: int = 128) -> Iterator[tuple[AttributeExample, torch.Tensor, torch.Tensor]]:
    """Per example, teacher-forced: the log-distributions predicting each target token (len(target), vocab)
    and the target ids, from right-padded batches."""
    device = next(model.parameters()).device
    for begin in range(0, len(examples), batch_size):
        chunk = examples[begin:begin + batch_size]
        sequences = [list(e.prompt_ids) + list(e.target_ids) for e in chunk]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        log_probs = F.log_softmax(model(ids.to(device), attention_mask=mask.to(device)).float(), dim=-1)
        for row, example in enumerate(chunk):
            first = len(example.prompt_ids) - 1  # the logit at position i predicts token i + 1
            span = slice(first, first + len(example.target_ids))
            yield example, log_probs[row, span], torch.tensor(example.target_ids, device=device)


def score_examples(model: nn.Module, examples: Sequence[AttributeExample], pad_id: int,
                   batch_size: int = 128) -> list[tuple[float, bool]]:
    """(attribute loss in nats/token, greedy-correct) per example, teacher-forced, right-padded batches."""
    results: list[tuple[float, bool]] = []
    for example, log_probs, targets in target_log_probs(model, examples, pad_id, batch_size):
        token_lp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        loss = float(-token_lp[: example.value_len].mean())
        results.append((loss, bool((log_probs.argmax(-1) == targets).all())))
    return results


def summarise(examples: Sequence[AttributeExample], scores: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """Overall and per-attribute ``accuracy`` and ``loss``."""
    by_attribute: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for example, score in zip(examples, scores, strict=True):
        by_attribute[example.attribute].append(score)
    out = {"accuracy": sum(c for _, c in scores) / max(len(scores), 1),
           "loss": sum(loss for loss, _ in scores) / max(len(scores), 1), "examples": float(len(scores))}
    for attribute, items in sorted(by_attribute.items()):
        out[f"{attribute}/accuracy"] = sum(c for _, c in items) / len(items)
        out[f"{attribute}/loss"] = sum(loss for loss, _ in items) / len(items)
    return out


def evaluate_examples(model: nn.Module, tokenizer: Any, examples: Sequence[AttributeExample],
                      batch_size: int = 128) -> dict[str, float]:
    """Accuracy and target loss of ``model`` on teacher-forced probes, overall and per attribute."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    scores = score_examples(model, examples, pad, batch_size)
    model.train(was_training)
    return summarise(examples, scores)


def evaluate_attributes(model: nn.Module, tokenizer: Any, records: Iterable[dict[str, Any]],
                        batch_size: int = 128) -> dict[str, float]:
    """Attribute accuracy and loss of ``model`` on eval records (see the module docstring)."""
    return evaluate_examples(model, tokenizer, build_examples(records, tokenizer), batch_size)
