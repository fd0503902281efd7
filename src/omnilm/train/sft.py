"""Chat supervised fine-tuning (stage type ``sft``): conversations in, loss on the assistant replies only.

Conversations are not packed: each row of a batch is one conversation, right-padded (see
``omnilm.data.examples``), so no conversation can attend to another. Data sources are jsonl files of
``messages`` or ``prompt``/``completion`` records (``where:`` selects records by field values); all sources are
concatenated. ``options.strict: true`` makes a bad record fatal instead of skipped and reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from omnilm.config import ConfigError
from omnilm.data.sources import ReadReport
from omnilm.train.checkpoint import latest_checkpoint
from omnilm.train.distributed import Dist, init_distributed, wrap_model
from omnilm.train.stage import (
    StageConfig,
    build_model,
    greedy_sampler,
    load_tokenizer,
    register_stage,
    stage_options,
)
from omnilm.train.trainer import Trainer, TrainResult, resolve_device


def print_read_report(stage: str, report: ReadReport, kept: int) -> None:
    print(f"[{stage}] {kept:,} examples from {report.documents:,} records; {report.malformed} skipped")
    for problem in report.problems[:10]:
        print(f"  skipped {problem}")


def post_training_setup(config: StageConfig, out_dir: Path, resume: bool,
                        build: Callable[[StageConfig, Any, Path | None, int], nn.Module] = build_model,
                        ) -> tuple[Any, ...]:
    """What every post-training stage starts with: device, process group, tokenizer and the starting model
    (made by ``build``, with ``build_model``'s arguments: a stage whose model is no plain LM passes its own)."""
    if not config.data:
        raise ConfigError(f"stage {config.name!r}: no data sources")
    device = resolve_device(config.train.device)
    info = init_distributed(device.type)
    tokenizer = load_tokenizer(config)
    resume_from = latest_checkpoint(out_dir / "checkpoints") if resume else None
    model = build(config, tokenizer, resume_from, config.train.seed).to(device)
    return device, info, tokenizer, model, resume_from


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


@register_stage("sft")
def run_sft_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.objectives.lm import masked_lm_loss

    options = stage_options(config, {"strict": False})
    train = config.train
    device, info, tokenizer, model, resume_from = post_training_setup(config, out_dir, resume)
    loader, tokens_per_batch = chat_batches(config, tokenizer, bool(options["strict"]), info)
    model = wrap_model(model, train.distributed, info, device)
    sample = greedy_sampler(tokenizer, train.sample_prompt, train.sample_tokens, chat=True) \
        if train.sample_prompt else None
    trainer = Trainer(model, masked_lm_loss, loader, train, out_dir, info=info, tokenizer=tokenizer, sample=sample,
                      tokens_per_batch=tokens_per_batch)
    return trainer.fit(resume=resume_from is not None)
