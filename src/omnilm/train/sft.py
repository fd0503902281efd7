"""Chat supervised fine-tuning (stage type ``sft``): conversations in, loss on the assistant replies only.

Conversations are not packed: each row of a batch is one conversation, right-padded (see
``omnilm.data.examples``), so no conversation can attend to another. Data sources are jsonl files of
``messages`` or ``prompt``/``completion`` records (``where:`` selects records by field values); all sources are
concatenated. Options:

``strict`` (false)          a bad record fails the run instead of being skipped and reported
``replay_data`` (none)      a tokenised dataset (e.g. the pre-training shards) replayed alongside the chat data,
                            the usual remedy against forgetting what pre-training taught
``replay_weight`` (0.5)     weight of the replayed language-modelling loss
``replay_batch_size`` (8)   replayed windows (of ``seq_len`` tokens) per micro-batch
"""

from __future__ import annotations

from collections.abc import Callable
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
from omnilm.train.trainer import Trainer, TrainResult


def print_read_report(stage: str, report: ReadReport, kept: int) -> None:
    print(f"[{stage}] {kept:,} examples from {report.documents:,} records; {report.malformed} skipped")
    for problem in report.problems[:10]:
        print(f"  skipped {problem}")


def padding_id(tokenizer: Any) -> int:
    """The id right-padded rows are filled with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id


def chat_batches(config: StageConfig, tokenizer: Any, strict: bool, info: Dist) -> tuple[Any, int]:
    """A loader of right-padded conversation batches (``tokens``, ``loss_mask`` over the assistant replies) from
    all the stage's chat sources, and the mean number of tokens per batch."""
    from omnilm.data.chat_data import load_chat_examples
    from omnilm.data.examples import ExampleLoader, pad_right

    train = config.train
    report = ReadReport()
    examples = []
    for source in config.data.values():
        examples += load_chat_examples([source.path], tokenizer, train.seq_len + 1, source.where,
                                       strict=strict, report=report)
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


SFT_OPTIONS = {"strict": False, "replay_data": None, "replay_weight": 0.5, "replay_batch_size": 8}


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


def replay_objective(objective: Callable[..., Any], weight: float) -> Callable[..., Any]:
    """``objective`` on the main batch plus ``weight`` × the causal-LM loss on the replayed windows."""
    from omnilm.objectives.lm import causal_lm_loss

    def combined(model: nn.Module, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        loss, extra = objective(model, batch["main"])
        replay_loss, _ = causal_lm_loss(model, batch["replay"])
        return loss + weight * replay_loss, extra | {"task_loss": loss.item(), "replay_loss": replay_loss.item()}

    return combined


@register_stage("sft")
def run_sft_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.data.loader import BatchLoader, TokenDataset
    from omnilm.objectives.lm import masked_lm_loss

    options = stage_options(config, SFT_OPTIONS)
    train = config.train
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume)
    loader, tokens_per_batch = chat_batches(config, tokenizer, bool(options["strict"]), info)
    objective = masked_lm_loss
    if options["replay_data"]:
        replayed = TokenDataset.open(options["replay_data"], "train")
        if replayed.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"stage {config.name!r}: replay_data {options['replay_data']} was tokenised with a "
                              f"vocabulary of {replayed.vocab_size}, the model's tokenizer has {tokenizer.vocab_size}")
        replay = BatchLoader(replayed, int(options["replay_batch_size"]), train.seq_len, seed=train.seed + 1,
                             rank=info.rank, world_size=info.world_size)
        loader, objective = WithReplay(loader, replay), replay_objective(masked_lm_loss, options["replay_weight"])
        tokens_per_batch += replay.batch_size * train.seq_len
    model = wrap_model(model, train.distributed, info, device)
    sample = greedy_sampler(tokenizer, train.sample_prompt, train.sample_tokens, chat=True) \
        if train.sample_prompt else None
    trainer = Trainer(model, objective, loader, train, out_dir, info=info, tokenizer=tokenizer, sample=sample,
                      tokens_per_batch=tokens_per_batch)
    return trainer.fit(resume=resume_from is not None)
