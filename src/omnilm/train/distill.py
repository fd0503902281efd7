"""Knowledge distillation (stage type ``distill``): a student learns a frozen teacher's next-token distributions.

The student is the stage's model (a fresh ``model:``, e.g. smaller than the teacher, or ``init_from``); the
teacher is a model folder with the same tokenizer. The loss mixes the temperature-softened KL to the teacher
with the hard-label cross-entropy (``omnilm.objectives.distill``); both are logged (``kl``, ``ce``). Options:

``teacher`` (required)      the teacher's model folder (also the default tokenizer)
``temperature`` (2.0)       softening τ of both distributions in the KL term
``alpha`` (0.5)             weight of the KL term; 1 − alpha goes to the cross-entropy
``data_format`` (tokens)    ``tokens``: tokenised datasets as in pretraining (every position counts);
                            ``chat``: chat jsonl as in SFT (only the assistant replies count)
``strict`` (false)          chat only: a bad record fails the run instead of being skipped and reported
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.train.distributed import unwrap, wrap_model
from omnilm.train.pretrain import token_batches
from omnilm.train.sft import chat_batches, reply_units
from omnilm.train.stage import (
    StageConfig,
    frozen_reference,
    greedy_sampler,
    register_stage,
    stage_options,
    stage_setup,
)
from omnilm.train.trainer import Objective, SummedObjective, Trainer, TrainResult

DISTILL_OPTIONS = {"teacher": None, "temperature": 2.0, "alpha": 0.5, "data_format": "tokens", "strict": False}
DATA_FORMATS = ("tokens", "chat")


def check_same_vocabulary(stage: str, teacher: nn.Module, student: nn.Module, tokenizer: Any,
                          teacher_folder: str | Path) -> None:
    """Refuse a teacher whose vocabulary differs from the student's: their distributions would not line up."""
    from omnilm.tokenizer import Tokenizer

    sizes = (teacher.config.vocab_size, unwrap(student).config.vocab_size)
    if sizes[0] != sizes[1]:
        raise ConfigError(f"stage {stage!r}: the teacher's vocabulary has {sizes[0]} tokens, the student's "
                          f"{sizes[1]}; distillation needs teacher and student to share the tokenizer")
    if (Path(teacher_folder) / "tokenizer.json").is_file():
        teacher_vocab = Tokenizer.from_dir(teacher_folder).backend.get_vocab(with_added_tokens=True)
        if teacher_vocab != tokenizer.backend.get_vocab(with_added_tokens=True):
            raise ConfigError(f"stage {stage!r}: the teacher's tokenizer ({teacher_folder}) differs from the "
                              "stage's; distillation needs teacher and student to share the tokenizer")


def lm_inputs_and_labels(batch: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token labels) of a token window batch (B, T+1) or of a chat batch with a ``loss_mask``."""
    from omnilm.objectives.lm import masked_targets

    if isinstance(batch, dict):
        tokens = batch["tokens"]
        return tokens[:, :-1], masked_targets(tokens, batch["loss_mask"])
    return batch[:, :-1], batch[:, 1:]


@register_stage("distill")
def run_distill_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.objectives.distill import distillation_loss

    options = stage_options(config, DISTILL_OPTIONS)
    teacher_folder = options["teacher"]
    if not teacher_folder:
        raise ConfigError(f"stage {config.name!r}: distill needs options.teacher (the teacher's model folder)")
    if not Path(teacher_folder).is_dir():
        raise ConfigError(f"stage {config.name!r}: options.teacher: model folder not found: {teacher_folder}")
    data_format = options["data_format"]
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"stage {config.name!r}: options.data_format must be one of {DATA_FORMATS}, "
                          f"got {data_format!r}")
    if not (config.tokenizer or config.init_from):
        config = dataclasses.replace(config, tokenizer=str(teacher_folder))
    train = config.train
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume)
    teacher = frozen_reference(teacher_folder, device)
    check_same_vocabulary(config.name, teacher, model, tokenizer, teacher_folder)
    if data_format == "tokens":
        loader, tokens_per_batch = token_batches(config, info), None
    else:
        loader, tokens_per_batch = chat_batches(config, tokenizer, bool(options["strict"]), info)
    temperature, alpha = float(options["temperature"]), float(options["alpha"])

    def objective(student: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = lm_inputs_and_labels(batch)
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        return distillation_loss(student(inputs), teacher_logits, labels, temperature=temperature, alpha=alpha)

    trained_with: Objective | SummedObjective = objective
    if data_format == "chat":
        # Replies differ in length: weigh every reply token of the global batch the same, as SFT does. Both
        # terms are means over the same tokens, so mean × count is the micro-batch's sum.
        def reply_sums(student: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
            loss, extra = objective(student, batch)
            return {"reply_tokens": loss * reply_units(batch)["reply_tokens"]}, extra

        trained_with = SummedObjective(reply_sums, reply_units)

    model = wrap_model(model, train.distributed, info, device)
    sample = greedy_sampler(tokenizer, train.sample_prompt, train.sample_tokens, chat=data_format == "chat") \
        if train.sample_prompt else None
    trainer = Trainer(model, trained_with, loader, train, out_dir, info=info, tokenizer=tokenizer, sample=sample,
                      tokens_per_batch=tokens_per_batch)
    return trainer.fit(resume=resume_from is not None)
