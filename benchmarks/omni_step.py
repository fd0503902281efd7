"""A Thinker's training step with the loss on the reply positions' logits alone, against the whole sequence's logits.

What is measured
    ``omni_sft`` scores the assistant's reply tokens: a few among hundreds of audio, image and video placeholders.
    The usual formulation (what transformers' thinker computes when given ``labels``, and what ``omni_sft`` did
    before) projects every position to the vocabulary and ignores all but the replies; omnilm's
    (:func:`omnilm.train.omni_sft.thinker_loss_sums`, ``Thinker.forward(logits_at=...)``) projects only the positions
    whose next token is a reply token. Both are timed on the same batches of each task of the omni recipe (image
    questions on fresh renders, spoken questions, fresh narrated videos with their sound, the same videos silent):
    forward, loss, backward (no optimiser step), the vision encoder frozen but its merger trained, as in the recipe.
    The two losses must agree within 1e-4 (relative), else the script fails. Runs are interleaved (full, selected,
    full, ...), ``--warmup`` untimed steps first; the table reports the median seconds per step of ``--repeats``
    and the ratio.

How to run
    .venv/bin/python benchmarks/omni_step.py --model runs/omni/final --media runs/omni/media
    .venv/bin/python benchmarks/omni_step.py --model runs/omni/final --media runs/omni/media --repeats 3 \
        --batch-size 4                                           # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from omnilm.omni.processor import OmniProcessor, media_arguments
from omnilm.omni.thinker import load_thinker
from omnilm.tokenizer import Tokenizer
from omnilm.train.omni_sft import FreshImageBatches, fresh_video_material, fresh_video_source, thinker_loss_sums


def full_sequence_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Summed reply loss from every position's logits, the non-reply targets ignored."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    logits = model(ids, batch["attention_mask"], **media_arguments(batch))
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum")


def task_batches(model_dir: Path, media: Path, thinker: Any, batch_size: int) -> dict[str, dict[str, Any]]:
    tokenizer = Tokenizer.from_dir(model_dir)
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget, root=media)

    def collate(conversations: list[list[dict[str, Any]]]) -> dict[str, Any]:
        return processor.collate([processor.encode(messages) for messages in conversations], 0)

    records = [json.loads(line) for line in (media / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    spoken = [r["messages"] for r in records if r["task"] == "spoken_qa"][:batch_size]
    narration = fresh_video_material(media / "narration.jsonl")
    tasks = ("video_qa", "video_digits", "video_words")
    return {"image_qa": FreshImageBatches(batch_size, 112, 4, collate, seed=1).next_batch(),
            "spoken_qa": collate(spoken),
            "video_qa": fresh_video_source(narration, 5, tasks, batch_size, collate, 1, 0).next_batch(),
            "video_silent": fresh_video_source(narration, 1, ("video_digits",), batch_size, collate, 1, 0,
                                               sound=False).next_batch()}


def timed_step(thinker: Any, batch: dict[str, Any], selected: bool) -> tuple[float, float]:
    thinker.zero_grad(set_to_none=True)
    began = time.perf_counter()
    loss = thinker_loss_sums(thinker, batch)[0]["reply"] if selected else full_sequence_loss(thinker, batch)
    loss.backward()
    return time.perf_counter() - began, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a thinker folder (e.g. the omni recipe's final)")
    parser.add_argument("--media", required=True, help="the omni synth folder (train.jsonl, narration.jsonl)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    thinker = load_thinker(args.model, dtype=torch.float32).train()
    thinker.visual.requires_grad_(False)
    thinker.visual.merger.requires_grad_(True)
    batches = task_batches(Path(args.model), Path(args.media), thinker, args.batch_size)
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.repeats} interleaved repeats")
    print("| task | tokens per row | reply tokens | whole sequence s/step | replies only s/step | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for task, batch in batches.items():
        for _ in range(args.warmup):
            timed_step(thinker, batch, False), timed_step(thinker, batch, True)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for selected in (False, True):
                elapsed, loss = timed_step(thinker, batch, selected)
                seconds[selected].append(elapsed)
                if selected:
                    reference = timed_step(thinker, batch, False)[1]
                    if abs(loss - reference) > 1e-4 * max(1.0, abs(reference)):
                        raise SystemExit(f"{task}: losses differ: {loss} against {reference}")
        full, chosen = statistics.median(seconds[False]), statistics.median(seconds[True])
        print(f"| {task} | {batch['input_ids'].shape[1]} | {int(batch['loss_mask'][:, 1:].sum())} | {full:.3f} "
              f"| {chosen:.3f} | {full / chosen:.2f}× |")


if __name__ == "__main__":
    main()
