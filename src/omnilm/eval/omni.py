"""Question answering over audio, images and video: does the Thinker's greedy reply equal the reference exactly?

Records are chat conversations (``omnilm data synth omni``) whose last message is the reference reply. As for the
text QA evaluation, greedy exactness is checked teacher-forced in one forward pass per batch: the reply (with its
closing ``<|im_end|>``) is what greedy decoding writes iff every reply token is the argmax after the tokens before
it. Results are given overall, per ``task`` (spoken_qa, text_qa, image_qa, video_qa) and per task and ``kind``
where records have one (image questions: colour, shape, count, digit, position).

:func:`evaluate_video_timeline` answers the video question another way: from the Thinker's own greedy timeline of
each video ("3 cat, 7, 1 dog, 5 red"), so that what is scored is the time join written out, then read back;
:func:`evaluate_video_answers` asks the video question as it is and reads the answer its greedy reply ends with
(the digit alone, or "… So 1." after the timeline).
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


def timeline_digits(reply: str) -> dict[str, str]:
    """word -> digit read off a timeline reply ("3 cat, 7, 1 dog, 5 red": each digit shown, then the word said while
    it was); segments that do not start with a digit are skipped, and a word named twice keeps its first digit."""
    digits: dict[str, str] = {}
    for segment in reply.split(","):
        digit, *words = segment.split() or [""]
        if digit.isdigit():
            for word in words:
                digits.setdefault(word, digit)
    return digits


@torch.inference_mode()
def greedy_reply_ids(thinker: Any, tokenizer: Any, batch: dict[str, Any], max_new_tokens: int) -> list[list[int]]:
    """The greedy reply tokens of every row of a left-padded prompt batch, up to the end of the turn (excluded)."""
    from omnilm.infer.generate import FINISHED
    from omnilm.infer.sampling import SamplingParams
    from omnilm.omni.generate import generate_thinker
    from omnilm.tokenizer.chat import IM_END

    eos = sorted({i for i in (tokenizer.eos_id, thinker.config.text.eos_token_id, tokenizer.token_to_id(IM_END))
                  if i is not None})
    replies: list[list[int]] = [[] for _ in range(batch["input_ids"].shape[0])]
    ended = [False] * len(replies)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    for step in generate_thinker(thinker, batch, params, eos, 0):
        for row, token in enumerate(step.tolist()):
            ended[row] = ended[row] or token == FINISHED or token in eos
            if not ended[row]:
                replies[row].append(token)
        if all(ended):
            break
    return replies


def greedy_replies(thinker: Any, tokenizer: Any, batch: dict[str, Any], max_new_tokens: int) -> list[str]:
    """The greedy reply of every row of a left-padded prompt batch, decoded, up to the end of the turn."""
    return [tokenizer.decode(reply).strip() for reply in greedy_reply_ids(thinker, tokenizer, batch, max_new_tokens)]


def prompt_replies(thinker: Any, tokenizer: Any, prompts: Sequence[list[dict[str, Any]]], root: str | Path,
                   batch_size: int, max_new_tokens: int) -> list[str]:
    """The greedy reply to each prompt (a conversation ending with a user turn; media paths under ``root``), in
    left-padded batches of ``batch_size``."""
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget or MediaBudget(), root)
    was_training = thinker.training
    thinker.eval()
    replies: list[str] = []
    for begin in range(0, len(prompts), batch_size):
        batch = processor.collate([processor.encode(p, add_generation_prompt=True)
                                   for p in prompts[begin:begin + batch_size]], 0, left_pad=True)
        replies += greedy_replies(thinker, tokenizer, batch, max_new_tokens)
    thinker.train(was_training)
    return replies


def evaluate_video_timeline(thinker: Any, tokenizer: Any, records: Sequence[dict[str, Any]], root: str | Path,
                            batch_size: int = 16, max_new_tokens: int = 32) -> dict[str, float]:
    """The video question ("which digit was on screen when the voice said X", ``video_qa`` records) answered from
    the Thinker's own timeline: each video is asked once for what was shown and said in time order
    (:data:`omnilm.data.synth.omni.VIDEO_TIMELINE_QUESTION`), greedily, and each of its questions is answered with
    the digit the reply pairs the word with. ``timeline_read`` is the share of questions whose word the reply
    names at all."""
    from omnilm.data.synth.omni import VIDEO_TIMELINE_QUESTION

    by_video: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_video[str(record["video"])].append(record)
    videos = sorted(by_video)
    prompts = [[{"role": "user", "content": [by_video[v][0]["messages"][0]["content"][0],
                                             {"type": "text", "text": VIDEO_TIMELINE_QUESTION}]}] for v in videos]
    right = named = 0
    for video, reply in zip(videos, prompt_replies(thinker, tokenizer, prompts, root, batch_size, max_new_tokens),
                            strict=True):
        digits = timeline_digits(reply)
        for record in by_video[video]:
            named += record["word"] in digits
            right += digits.get(record["word"]) == record["answer"]
    total = max(len(records), 1)
    return {"accuracy": right / total, "timeline_read": named / total, "examples": float(len(records))}


def final_answer(reply: str) -> str:
    """The answer a reply ends with: its last word, without a closing full stop ("3 cat, 7, 1 dog, 5 red. 3 cat, dog?
    no; 1 dog, dog? yes. So 1." -> "1", "7" -> "7")."""
    words = reply.split()
    return words[-1].removesuffix(".") if words else ""


def evaluate_video_answers(thinker: Any, tokenizer: Any, records: Sequence[dict[str, Any]], root: str | Path,
                           batch_size: int = 16, max_new_tokens: int = 96) -> dict[str, float]:
    """The video question asked as it is (``video_qa`` records: their user turn), answered greedily: right when the
    reply's :func:`final_answer` is the record's answer, whether the reply is the digit alone or the timeline first
    (``video_qa_reasoned``: "3 cat, 7, 1 dog, 5 red. 3 cat, dog? no; 1 dog, dog? yes. So 1."). ``reasoned`` is the
    share of replies that write the timeline out first and read the answer off it ("So" in them)."""
    replies = prompt_replies(thinker, tokenizer, [r["messages"][:1] for r in records], root, batch_size,
                             max_new_tokens)
    total = max(len(records), 1)
    return {"accuracy": sum(final_answer(reply) == r["answer"] for r, reply in zip(records, replies, strict=True))
            / total, "reasoned": sum("So " in reply for reply in replies) / total, "examples": float(len(records))}
