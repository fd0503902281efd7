"""The causal-LM stage types (``pretrain``, ``midtrain``): token shards in, a model folder out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnilm.config import ConfigError
from omnilm.objectives.lm import causal_lm_loss, evaluate_lm, token_byte_lengths
from omnilm.train.distributed import Dist
from omnilm.train.parallel import is_parallel, parallelize
from omnilm.train.stage import (
    LM_STAGE_TYPES,
    StageConfig,
    greedy_sampler,
    register_stage,
    stage_options,
    stage_setup,
)
from omnilm.train.trainer import Objective, Trainer, TrainResult

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
    return BatchLoader(datasets, train.batch_size, train.seq_len, seed=train.seed, rank=info.data_rank,
                       world_size=info.data_size, weights=mixture_weights(config),
                       batches_per_step=train.accumulation(info.data_size))


#: Options of the causal-LM stages: ``mtp`` (a ``omnilm.model.mtp.MTPConfig`` mapping: n_heads, variant,
#: loss_weights) trains multi-token-prediction heads beside the LM head (saved in side files of every model
#: folder); ``selective`` ({reference: model folder, keep: fraction}) keeps only the ``keep`` fraction of
#: each batch's tokens with the highest excess loss over the reference model (Rho-1's selective LM).
LM_OPTIONS: dict[str, Any] = {"mtp": None, "selective": None}


def lm_objective(options: dict[str, Any], device: Any) -> Objective:
    """The stage's loss: next-token cross-entropy, with multi-token heads or token selection when asked."""
    if options["mtp"] and options["selective"]:
        raise ConfigError("options mtp and selective cannot be combined")
    if options["mtp"]:
        from omnilm.objectives.mtp import multi_token_objective

        return multi_token_objective(mtp_config(options).weights)
    if options["selective"]:
        from omnilm.objectives.selective import selective_objective
        from omnilm.train.stage import frozen_reference

        selective = dict(options["selective"])
        unknown = sorted(set(selective) - {"reference", "keep"})
        if unknown or "reference" not in selective:
            raise ConfigError(f"option selective needs reference (a model folder) and optionally keep; unknown "
                              f"{unknown}")
        return selective_objective(frozen_reference(selective["reference"], device), float(selective.get("keep", 0.6)))
    return causal_lm_loss


def mtp_config(options: dict[str, Any]):  # noqa: ANN201 - omnilm.model.mtp.MTPConfig
    from omnilm.config import from_dict
    from omnilm.model.mtp import MTPConfig

    return from_dict(MTPConfig, dict(options["mtp"]), source="option mtp")


def _with_heads(options: dict[str, Any]):  # noqa: ANN202 - a stage_setup model builder
    """build_model, then multi-token heads around the decoder (loaded when the starting folder has some)."""
    from omnilm.model.mtp import MultiTokenModel, has_heads, load_heads
    from omnilm.train.stage import build_model

    def build(config: StageConfig, tokenizer: Any, resume_from: Path | None, seed: int) -> MultiTokenModel:
        decoder = build_model(config, tokenizer, resume_from, seed)
        mtp = mtp_config(options)
        start = resume_from or config.init_from
        heads = load_heads(start, decoder) if start and has_heads(start) else None
        if heads is not None and heads.mtp != mtp:
            heads = None  # other heads than asked for: start fresh ones
        return MultiTokenModel(decoder, mtp, heads).train()

    return build


@register_stage(*LM_STAGE_TYPES)
def run_lm_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    """Next-token prediction on a mixture of tokenised datasets (optionally with multi-token heads or token
    selection, see ``LM_OPTIONS``)."""
    from omnilm.data.loader import BatchLoader, TokenDataset

    train = config.train
    options = stage_options(config, LM_OPTIONS)
    build = _with_heads(options) if options["mtp"] else None
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume, build)
    objective = lm_objective(options, device)
    if (options["mtp"] or options["selective"]) and is_parallel(train):
        raise ConfigError(f"stage {config.name!r}: tensor/pipeline parallelism trains plain next-token "
                          "prediction (no mtp or selective option)")
    model, info = parallelize(model, train, info, device)
    loader = token_batches(config, info)
    val_sets = {}
    for name, source in config.data.items():
        if (Path(source.path) / "val").is_dir():
            val_sets[name] = TokenDataset.open(source.path, "val")
    evaluate = None
    if val_sets and train.eval_batches > 0:
        val_loader = BatchLoader(val_sets, train.batch_size, train.seq_len, seed=train.seed + 1,
                                 rank=info.data_rank, world_size=info.data_size)
        val_batches = [val_loader.next_batch() for _ in range(train.eval_batches)]
        byte_lengths = token_byte_lengths(tokenizer)

        def evaluate(model):  # noqa: ANN001, ANN202
            if hasattr(model, "pipeline_step"):  # a pipeline stage: the last one scores the logits
                return model.evaluate(lambda whole, batches: evaluate_lm(whole, batches, byte_lengths), val_batches)
            return evaluate_lm(model, val_batches, byte_lengths)

    sample = greedy_sampler(tokenizer, train.sample_prompt, train.sample_tokens) if train.sample_prompt else None
    trainer = Trainer(model, objective, loader, train, out_dir, info=info, tokenizer=tokenizer,
                      evaluate=evaluate, sample=sample)
    return trainer.fit(resume=resume_from is not None)
