"""SFT step time with ``length_groups``: rows of similar length in separate forward passes, against one padded pass.

What is measured
    The SFT stage of a run folder (its ``stage_config.json``: the same data sources, weights, batch size and
    ``seq_len``) and its starting model. The same batches (drawn once, seeded) go through a forward and backward
    pass of the summed reply loss (:func:`omnilm.objectives.lm.grouped_masked_lm_loss`) with 1 group (one pass
    padded to the longest row: what SFT did before) and with each ``--groups`` value. Per setting: the padded
    token positions computed and the time of ``--batches`` batches; the settings are interleaved, ``--repeats``
    times after one untimed warm-up round, and the median is reported with the ratio against one group. The
    replayed pre-training windows of a stage with ``replay_data`` are left out: their cost is the same in every
    setting. The losses of every setting are checked to agree with one group's (relative 1e-5).

How to run
    omnilm run --preset rag_sft --out runs/rag          # or any run whose SFT stage has started once
    .venv/bin/python benchmarks/sft_length_groups.py runs/rag --groups 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from omnilm.model.hf import load_pretrained
from omnilm.objectives.lm import grouped_masked_lm_loss, length_groups
from omnilm.tokenizer import Tokenizer
from omnilm.train.distributed import Dist
from omnilm.train.sft import chat_batches
from omnilm.train.stage import CONFIG_RECORD, StageConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with an sft stage")
    parser.add_argument("--stage", default="sft")
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = StageConfig.from_mapping(json.loads((args.run / args.stage / CONFIG_RECORD).read_text()), args.stage)
    tokenizer = Tokenizer.from_dir(config.tokenizer or config.init_from)
    loader, _ = chat_batches(config, tokenizer, strict=False, info=Dist())
    batches = [loader.next_batch() for _ in range(args.batches)]
    model = load_pretrained(config.init_from)
    model.train()
    settings = [1, *args.groups]

    def step(groups: int) -> float:
        total = 0.0
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss, _ = grouped_masked_lm_loss(model, batch, groups)
            loss.backward()
            total += float(loss.detach())
        return total

    reference = step(1)
    for groups in settings[1:]:
        got = step(groups)
        if abs(got - reference) > 1e-5 * abs(reference):
            raise SystemExit(f"{groups} groups: summed loss {got} differs from one pass's {reference}")
    times: dict[int, list[float]] = {g: [] for g in settings}
    for _ in range(args.repeats):
        for groups in settings:
            start = time.perf_counter()
            step(groups)
            times[groups].append(time.perf_counter() - start)

    def positions(groups: int) -> int:
        if groups == 1:  # the batch as it is, padded to its longest row
            return sum(b["tokens"].numel() for b in batches)
        return sum(sum(g["tokens"].numel() for g in length_groups(b, groups)) for b in batches)

    base = statistics.median(times[1])
    print(f"{args.run / args.stage}: {args.batches} batches of {config.train.batch_size} conversations, "
          f"torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    print("| length_groups | token positions | seconds per batch | speed-up |")
    print("|---:|---:|---:|---:|")
    for groups in settings:
        median = statistics.median(times[groups])
        print(f"| {groups} | {positions(groups):,} | {median / args.batches:.3f} | {base / median:.2f}× |")


if __name__ == "__main__":
    main()
