"""Question answering over audio, images and video: does the Thinker's greedy reply equal the reference exactly?

Records are chat conversations (``omnilm data synth omni``) whose last message is the reference reply. As for the
text QA evaluation, greedy exactness is checked teacher-forced in one forward pass per batch: the reply (with its
closing ``<|im_end|>``) is what greedy decoding writes iff every reply token is the argmax after the tokens before
it. Results are given overall, per ``task`` (spoken_qa, text_qa, image_qa, video_qa) and per task and ``kind``
where records have one (image questions: colour, shape, count, digit, position).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from omnilm.omni.config import MediaBudget
from omnilm.omni.processor import OmniProcessor, media_arguments


@torch.no_grad()
def score_omni(thinker: Any, tokenizer: Any, records: Sequence[dict[str, Any]], root: str | Path,
               batch_size: int = 32) -> list[tuple[float, bool]]:
    """(reply loss in nats/token, greedy-correct) per record."""
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget or MediaBudget(), root)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    was_training = thinker.training
    thinker.eval()
    scores = []
    for begin in range(0, len(records), batch_size):
        examples = [processor.encode(r["messages"]) for r in records[begin:begin + batch_size]]
        batch = processor.collate(examples, pad)
        logits = thinker(batch["input_ids"], batch["attention_mask"], **media_arguments(batch))
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        targets, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool()
        for row in range(len(examples)):
            picked = mask[row]
            token_lp = log_probs[row][picked].gather(-1, targets[row][picked][:, None]).squeeze(-1)
            correct = bool((log_probs[row][picked].argmax(-1) == targets[row][picked]).all())
            scores.append((float(-token_lp.mean()), correct))
    thinker.train(was_training)
    return scores


def evaluate_omni(thinker: Any, tokenizer: Any, records: Sequence[dict[str, Any]], root: str | Path,
                  batch_size: int = 32) -> dict[str, float]:
    """Accuracy and reply loss, overall, per task and per task and kind."""
    scores = score_omni(thinker, tokenizer, records, root, batch_size)
    by_task: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for record, score in zip(records, scores, strict=True):
        task = record.get("task", "all")
        by_task[task].append(score)
        if "kind" in record:
            by_task[f"{task}/{record['kind']}"].append(score)
    out = {"accuracy": sum(c for _, c in scores) / max(len(scores), 1),
           "loss": sum(loss for loss, _ in scores) / max(len(scores), 1), "examples": float(len(scores))}
    for task, items in sorted(by_task.items()):
        out[f"{task}/accuracy"] = sum(c for _, c in items) / len(items)
    return out
