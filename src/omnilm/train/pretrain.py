"""The causal-LM stage types (``pretrain``, ``midtrain``): token shards in, a model folder out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omnilm.config import ConfigError
from omnilm.objectives.lm import causal_lm_loss, evaluate_lm, token_byte_lengths
from omnilm.train.distributed import Dist, wrap_model
from omnilm.train.stage import (
    LM_STAGE_TYPES,
    StageConfig,
    greedy_sampler,
    register_stage,
    stage_setup,
)
from omnilm.train.trainer import Trainer, TrainResult

if TYPE_CHECKING:
    from omnilm.data.loader import BatchLoader


def mixture_weights(config: StageConfig):  # noqa: ANN201 - a mapping or a step -> mapping function
    """Static weights from ``data``, or a function of the step when ``mixture_schedule`` is set."""
    static = {name: source.weight for name, source in config.data.items()}
    phases = config.mixture_schedule
    if not phases:
        return static
    for phase in phases:
        unknown = set(phase.get("weights", {})) - set(static)
        if unknown or "until_step" not in phase:
            raise ConfigError(f"stage {config.name!r}: each mixture_schedule phase needs until_step and weights "
                              f"over the data names {sorted(static)}")

    def at_step(step: int) -> dict[str, float]:
        for phase in phases:
            if step < phase["until_step"]:
                return phase["weights"]
        return static

    return at_step


def token_batches(config: StageConfig, info: Dist) -> BatchLoader:
    """The loader of training windows (B, seq_len + 1) over the ``train`` splits of the stage's tokenised
    datasets, mixed by weight (or by ``mixture_schedule``)."""
    from omnilm.data.loader import BatchLoader, TokenDataset

    train = config.train
    datasets = {name: TokenDataset.open(source.path, "train") for name, source in config.data.items()}
    return BatchLoader(datasets, train.batch_size, train.seq_len, seed=train.seed, rank=info.rank,
                       world_size=info.world_size, weights=mixture_weights(config),
                       batches_per_step=train.accumulation(info.world_size))


@register_stage(*LM_STAGE_TYPES)
def run_lm_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    """Next-token prediction on a mixture of tokenised datasets."""
    from omnilm.data.loader import BatchLoader, TokenDataset

    train = config.train
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume)
    model = wrap_model(model, train.distributed, info, device)
    loader = token_batches(config, info)
    val_sets = {}
    for name, source in config.data.items():
        if (Path(source.path) / "val").is_dir():
            val_sets[name] = TokenDataset.open(source.path, "val")
    evaluate = None
    if val_sets and train.eval_batches > 0:
        val_loader = BatchLoader(val_sets, train.batch_size, train.seq_len, seed=train.seed + 1, rank=info.rank,
                                 world_size=info.world_size)
        val_batches = [val_loader.next_batch() for _ in range(train.eval_batches)]
        byte_lengths = token_byte_lengths(tokenizer)

        def evaluate(model):  # noqa: ANN001, ANN202
            return evaluate_lm(model, val_batches, byte_lengths)

    sample = greedy_sampler(tokenizer, train.sample_prompt, train.sample_tokens) if train.sample_prompt else None
    trainer = Trainer(model, causal_lm_loss, loader, train, out_dir, info=info, tokenizer=tokenizer,
                      evaluate=evaluate, sample=sample)
    return trainer.fit(resume=resume_from is not None)
