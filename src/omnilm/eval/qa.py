"""Question answering in chat format: does the model's greedy reply equal the reference answer exactly?

Each record is a conversation whose last message is the reference assistant reply. The prompt is the
conversation before it with the assistant header; the target is the reply's tokens plus ``<|im_end|>``, so a
correct answer must also stop. As for attribute probes, greedy exactness is checked teacher-forced in one
forward pass (greedy reproduces the target iff every target token is the argmax), with the same scorer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from omnilm.eval.attributes import AttributeExample, evaluate_examples
from omnilm.tokenizer.chat import IM_END, encode_chat


def build_qa_examples(records: Iterable[dict[str, Any]], tokenizer: Any) -> list[AttributeExample]:
    """Teacher-forced probes from chat records (``messages`` ending with the assistant's reference reply)."""
    im_end = tokenizer.token_to_id(IM_END)
    examples = []
    for record in records:
        messages = record["messages"]
        prompt_ids, _ = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
        full_ids, _ = encode_chat(tokenizer, messages)
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"reply of {messages[-1]!r} does not start at a token boundary")
        reply = full_ids[len(prompt_ids):]
        target = reply[:reply.index(im_end) + 1]
        examples.append(AttributeExample(record.get("person_id"), record.get("attribute", "all"),
                                         tuple(prompt_ids), tuple(target), max(1, len(target) - 1)))
    return examples


def evaluate_qa(model: nn.Module, tokenizer: Any, records: Iterable[dict[str, Any]],
                batch_size: int = 128) -> dict[str, float]:
    """Exact-answer accuracy and answer loss, overall and per ``attribute``."""
    return evaluate_examples(model, tokenizer, build_qa_examples(records, tokenizer), batch_size)
