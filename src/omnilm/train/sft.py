"""Chat supervised fine-tuning (stage type ``sft``): conversations in, loss on the assistant replies only.

Conversations are not packed: each row of a batch is one conversation, right-padded (see
``omnilm.data.examples``), so no conversation can attend to another. Data sources are jsonl files of
``messages`` or ``prompt``/``completion`` records (``where:`` selects records by field values); all sources are
concatenated, each record ``weight`` times per epoch (default 1; 2.5: every record twice and a fixed random half
of them a third time). Options:

``strict`` (false)          a bad record fails the run instead of being skipped and reported
``replay_data`` (none)      a tokenised dataset (e.g. the pre-training shards) replayed alongside the chat data,
                            the usual remedy against forgetting what pre-training taught
``replay_weight`` (0.5)     weight of the replayed language-modelling loss
``replay_batch_size`` (8)   replayed windows (of ``seq_len`` tokens) per micro-batch
``length_groups`` (1)       forward passes per micro-batch over rows of similar length, each padded only to its own
                            longest row: the same loss and gradient, less work when short and long conversations
                            mix (e.g. closed-book questions beside ones with retrieved passages)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from torch import nn

from omnilm.config import ConfigError
from omnilm.data.sources import ReadReport
from omnilm.train.distributed import Dist, wrap_model
from omnilm.train.stage import (
    StageConfig,
    greedy_sampler,
    register_stage,
    stage_options,
    stage_setup,
)
from omnilm.train.trainer import SummedObjective, Trainer, TrainResult


def print_read_report(stage: str, report: ReadReport, kept: int) -> None:
    # Each data source reads its own file: two sources filtering one file count its records twice.
    print(f"[{stage}] {kept:,} examples from {report.documents:,} records read; {report.malformed} skipped")
    for problem in report.problems[:10]:
        print(f"  skipped {problem}")


def padding_id(tokenizer: Any) -> int:
    """The id right-padded rows are filled with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def weighted(examples: list[Any], weight: float, rng: random.Random, where: str) -> list[Any]:
    """``examples`` as often per epoch as ``weight`` says: each ``int(weight)`` times, and the fraction left over
    as a fixed random share of them (drawn by ``rng``), so a small source is not drowned by a large one."""
    if weight < 0:
        raise ConfigError(f"{where}: weight must be at least 0, got {weight}")
    whole, extra = int(weight), round((weight - int(weight)) * len(examples))
    return examples * whole + rng.sample(examples, extra)


def chat_batches(config: StageConfig, tokenizer: Any, strict: bool, info: Dist) -> tuple[Any, int]:
    """A loader of right-padded conversation batches (``tokens``, ``loss_mask`` over the assistant replies) from
    all the stage's chat sources, and the mean number of tokens per batch."""
    from omnilm.data.chat_data import load_chat_examples
    from omnilm.data.examples import ExampleLoader, pad_right

    train = config.train
    report = ReadReport()
    examples = []
    for name, source in config.data.items():
        loaded = load_chat_examples([source.path], tokenizer, train.seq_len + 1, source.where, strict=strict,
                                    report=report)
        examples += weighted(loaded, source.weight, random.Random(f"{train.seed}:{name}"), f"{config.name}.{name}")
    if info.is_main:
        print_read_report(config.name, report, len(examples))
    pad = padding_id(tokenizer)

    def collate(indices: list[int]) -> dict[str, Any]:
        chosen = [examples[i] for i in indices]
        return {"tokens": pad_right([e.ids for e in chosen], pad), "loss_mask": pad_right([e.mask for e in chosen], 0)}

    loader = ExampleLoader(len(examples), train.batch_size, collate, seed=train.seed, rank=info.rank,
                           world_size=info.world_size)
    mean_len = sum(len(e.ids) for e in examples) / max(len(examples), 1)
    return loader, round(mean_len * train.batch_size)


SFT_OPTIONS = {"strict": False, "replay_data": None, "replay_weight": 0.5, "replay_batch_size": 8,
               "length_groups": 1}


class WithReplay:
    """Each batch: the stage's own batch plus a batch of replayed pre-training windows (both resumable)."""

    def __init__(self, main: Any, replay: Any) -> None:
        self.main, self.replay = main, replay

    def next_batch(self) -> dict[str, Any]:
        return {"main": self.main.next_batch(), "replay": self.replay.next_batch()}

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.replay.load_state_dict(state["replay"])


def reply_loss_sums(model: nn.Module, batch: dict[str, Any], length_groups: int = 1,
                    ) -> tuple[dict[str, Any], dict[str, float]]:
    """The summed next-token loss of a chat batch's assistant-reply tokens (``loss_mask`` 1), over up to
    ``length_groups`` forward passes (:func:`omnilm.objectives.lm.grouped_masked_lm_loss`)."""
    from omnilm.objectives.lm import grouped_masked_lm_loss

    total, extra = grouped_masked_lm_loss(model, batch, length_groups)
    return {"reply_tokens": total}, extra


def reply_units(batch: dict[str, Any]) -> dict[str, float]:
    from omnilm.objectives.lm import loss_token_count

    return {"reply_tokens": loss_token_count(batch)}


def sft_objective(length_groups: int = 1) -> SummedObjective:
    """Chat SFT: the loss of every reply token of the global batch weighs the same, however the conversations are
    split into micro-batches and processes (a per-micro-batch mean would overweight short replies)."""
    return SummedObjective(lambda model, batch: reply_loss_sums(model, batch, length_groups), reply_units)


SFT_OBJECTIVE = sft_objective()


def replay_objective(weight: float, length_groups: int = 1) -> SummedObjective:
    """:func:`sft_objective` on the main batch plus ``weight`` × the causal-LM loss on the replayed windows,
    each term normalised over its own tokens in the global batch."""
    from omnilm.objectives.lm import causal_lm_loss, loss_token_count

    def loss_sums(model: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        main, replay = batch["main"], batch["replay"]
        sums, extra = reply_loss_sums(model, main, length_groups)
        replay_sum, _ = causal_lm_loss(model, replay, reduction="sum")
        # Logged as this micro-batch's means, on the scale of a plain SFT or pre-training loss.
        task_loss = float(sums["reply_tokens"].detach()) / max(loss_token_count(main), 1)
        replay_loss = float(replay_sum.detach()) / replay[:, 1:].numel()
        return (sums | {"replay_tokens": weight * replay_sum},
                extra | {"task_loss": task_loss, "replay_loss": replay_loss})

    def units(batch: dict[str, Any]) -> dict[str, float]:
        return reply_units(batch["main"]) | {"replay_tokens": batch["replay"][:, 1:].numel()}

    return SummedObjective(loss_sums, units)


@register_stage("sft")
def run_sft_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.data.loader import BatchLoader, TokenDataset

    options = stage_options(config, SFT_OPTIONS)
    train = config.train
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume)
    loader, tokens_per_batch = chat_batches(config, tokenizer, bool(options["strict"]), info)
    length_groups = int(options["length_groups"])
    if length_groups < 1:
        raise ConfigError(f"stage {config.name!r}: options.length_groups must be ≥ 1, got {length_groups}")
    objective = sft_objective(length_groups)
    if options["replay_data"]:
        replayed = TokenDataset.open(options["replay_data"], "train")
        if replayed.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"stage {config.name!r}: replay_data {options['replay_data']} was tokenised with a "
                              f"vocabulary of {replayed.vocab_size}, the model's tokenizer has {tokenizer.vocab_size}")
        replay = BatchLoader(replayed, int(options["replay_batch_size"]), train.seq_len, seed=train.seed + 1,
                             rank=info.rank, world_size=info.world_size)
        loader, objective = WithReplay(loader, replay), replay_objective(float(options["replay_weight"]),
                                                                               length_groups)
        tokens_per_batch += replay.batch_size * train.seq_len
    model = wrap_model(model, train.distributed, info, device)
    sample = greedy_sampler(tokenizer, train.sample_prompt, train.sample_tokens, chat=True) \
        if train.sample_prompt else None
    trainer = Trainer(model, objective, loader, train, out_dir, info=info, tokenizer=tokenizer, sample=sample,
                      tokens_per_batch=tokens_per_batch)
    return trainer.fit(resume=resume_from is not None)
