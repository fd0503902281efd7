"""One training stage from a config: build the model, data and objective, then run the trainer.

``omnilm train --config stage.yaml`` runs one stage; a recipe runs several in order, each starting from the
previous stage's final model. Stage types are looked up in ``STAGE_BUILDERS``; a type without a builder
fails with a message naming it. Every run folder records the stage's config in ``stage_config.json``; resuming
checkpoints under a different config is refused, naming the changed keys, unless forced.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError, from_dict
from omnilm.errors import UserError
from omnilm.train.config import OPERATIONAL_FIELDS, TrainConfig
from omnilm.train.trainer import TrainResult
from omnilm.utils.atomic import write_json_atomic
from omnilm.utils.fingerprint import changed_keys

CONFIG_RECORD = "stage_config.json"
LM_STAGE_TYPES = ("pretrain", "midtrain")
NO_LORA_STAGE_TYPES = ("reward", "ppo")
KNOWN_STAGE_TYPES = LM_STAGE_TYPES + ("sft", "lora", "reward", "dpo", "ppo", "grpo", "rl", "distill", "omni_sft",
                                     "omni_encoders", "talker", "token2wav", "mlm", "electra", "classify",
                                     "span_corruption", "denoise", "seq2seq_sft")


@dataclass
class DataSource:
    """A data source of a stage: for pretrain/midtrain a tokenised dataset (the ``--out`` folder of
    ``omnilm data tokenize``); for post-training stages jsonl files of chat or preference records."""

    path: str
    #: Mixture weight (pretrain/midtrain); chat SFT: times each record is seen per epoch (fractions: a fixed share).
    weight: float = 1.0
    #: Post-training: keep only records whose fields equal these values (e.g. ``{split: train}``).
    where: dict[str, Any] | None = None


@dataclass
class StageConfig:
    """One stage of a recipe, or the whole config of ``omnilm train``."""

    #: Stage name (a folder under the run directory).
    name: str = "pretrain"
    #: Objective: pretrain / midtrain (causal LM); post-training types arrive with their objectives.
    type: str = "pretrain"
    #: A fresh model: a ModelConfig mapping (``preset:`` plus overrides); vocab size and special ids come
    #: from the tokenizer. With ``init_from`` it may only change the context settings of the loaded model
    #: (``omnilm.model.context.CONTEXT_FIELDS``: max_seq_len, rope_theta, rope_scaling, sliding_window, ...),
    #: e.g. to extend its context with position interpolation, NTK or YaRN before fine-tuning at a new length.
    model: dict[str, Any] | None = None
    #: Start from this model folder (in a recipe: the previous stage's final model, filled in automatically).
    init_from: str | None = None
    #: Tokenizer folder (default: the ``init_from`` folder).
    tokenizer: str | None = None
    #: Named data sources; their ``train`` splits are mixed by weight, their ``val`` splits are evaluated.
    data: dict[str, DataSource] = field(default_factory=dict)
    #: Optional per-step mixture schedule: a list of {"until_step": S, "weights": {name: w}} phases.
    mixture_schedule: list[dict[str, Any]] = field(default_factory=list)
    #: Optimisation and logging settings.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))
    #: Train LoRA adapters only (a ``omnilm.adapters.LoraConfig`` mapping: r, alpha, dropout, target_modules);
    #: model folders then hold the merged model plus ``adapter/`` in PEFT's format.
    lora: dict[str, Any] | None = None
    #: Stage-type specific options (used by post-training objectives).
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "stage") -> StageConfig:
        values = dict(values)
        train = from_dict(TrainConfig, values.pop("train", {}) or {}, source=f"{source}.train")
        data = {}
        for name, item in (values.pop("data", {}) or {}).items():
            item = {"path": item} if isinstance(item, str) else item
            data[name] = from_dict(DataSource, item, source=f"{source}.data.{name}")
        return from_dict(cls, values | {"train": train, "data": data}, source=source)

    def to_mapping(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


StageBuilder = Callable[[StageConfig, Path, bool], TrainResult]
STAGE_BUILDERS: dict[str, StageBuilder] = {}


def register_stage(*types: str) -> Callable[[StageBuilder], StageBuilder]:
    """Decorator: the function that runs stages of the given types."""

    def decorate(fn: StageBuilder) -> StageBuilder:
        for stage_type in types:
            STAGE_BUILDERS[stage_type] = fn
        return fn

    return decorate


def comparable_config(config: StageConfig) -> dict[str, Any]:
    """The config as a mapping without the operational train settings (``OPERATIONAL_FIELDS``): what a resumed
    run must share with the checkpoints it continues, and what a recipe fingerprints."""
    values = config.to_mapping()
    values["train"] = {k: v for k, v in values["train"].items() if k not in OPERATIONAL_FIELDS}
    return values


def resume_changes(config: StageConfig, out_dir: str | Path) -> list[str]:
    """How ``config`` differs from the config that wrote the checkpoints in ``out_dir`` (``key: old → new``
    lines; empty when nothing changed or there is nothing to resume)."""
    from omnilm.train.checkpoint import latest_checkpoint, load_trainer_state

    out_dir = Path(out_dir)
    latest = latest_checkpoint(out_dir / "checkpoints")
    if latest is None:
        return []
    current = comparable_config(config)
    if (out_dir / CONFIG_RECORD).is_file():
        recorded = json.loads((out_dir / CONFIG_RECORD).read_text(encoding="utf-8"))
    else:
        # Checkpoints from before the config was recorded: their trainer state still holds the train settings.
        recorded = {"train": load_trainer_state(latest).get("config", {})}
        current = {"train": current["train"]}
    recorded["train"] = {k: v for k, v in recorded.get("train", {}).items() if k not in OPERATIONAL_FIELDS}
    return changed_keys(recorded, current)


def run_stage(config: StageConfig, out_dir: str | Path, resume: bool = False, force: bool = False) -> TrainResult:
    """Run one stage into ``out_dir`` (continuing from its latest checkpoint with ``resume``).

    Resuming checkpoints written under a different config (operational settings such as ``log_every`` aside)
    is a ``ConfigError`` naming the changed keys, unless ``force``: then the run continues under the new config.
    """
    out_dir = Path(out_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0
    changes = resume_changes(config, out_dir) if resume else []
    if changes and not force:
        raise ConfigError(
            f"stage {config.name!r}: cannot resume {out_dir} under a changed config:\n  " + "\n  ".join(changes)
            + f"\nIts checkpoints were trained with the config recorded in {out_dir / CONFIG_RECORD}. Resume with "
            "that config, train into a new --out, or pass --force to continue under the new one (what extending "
            "the budget, train.max_steps or train.max_tokens, needs; the schedule then follows the new budget "
            "unless train.schedule_steps fixes it).")
    _load_builders()
    builder = STAGE_BUILDERS.get(config.type)
    if builder is None:
        if config.type in KNOWN_STAGE_TYPES:
            raise UserError(f"stage {config.name!r}: stage type {config.type!r} is not implemented in this build "
                            f"(implemented: {', '.join(sorted(STAGE_BUILDERS))})")
        raise UserError(f"stage {config.name!r}: unknown stage type {config.type!r} "
                        f"(known: {', '.join(KNOWN_STAGE_TYPES)})")
    if (config.train.tensor_parallel > 1 or config.train.pipeline_parallel > 1) and config.type not in LM_STAGE_TYPES:
        raise UserError(f"stage {config.name!r}: tensor and pipeline parallelism train {' and '.join(LM_STAGE_TYPES)} "
                        f"stages only, not {config.type!r} (use train.distributed: ddp or fsdp)")
    if config.lora and config.type in NO_LORA_STAGE_TYPES:
        # Their models wrap the LM with a head and save themselves; adapters there are not written yet.
        raise UserError(f"stage {config.name!r}: lora is not supported for stage type {config.type!r} "
                        f"(supported: every type but {', '.join(NO_LORA_STAGE_TYPES)})")
    if main_process:
        write_json_atomic(out_dir / CONFIG_RECORD, config.to_mapping())
    return builder(config, out_dir, resume)


def _load_builders() -> None:
    """Import the modules that register stage types (kept lazy: they pull in heavy dependencies)."""
    import omnilm.train.distill  # noqa: F401
    import omnilm.train.dpo  # noqa: F401
    import omnilm.train.encoder_stages  # noqa: F401
    import omnilm.train.grpo  # noqa: F401
    import omnilm.train.omni_encoders  # noqa: F401
    import omnilm.train.omni_sft  # noqa: F401
    import omnilm.train.ppo  # noqa: F401
    import omnilm.train.pretrain  # noqa: F401
    import omnilm.train.reward  # noqa: F401
    import omnilm.train.seq2seq_stages  # noqa: F401
    import omnilm.train.sft  # noqa: F401
    import omnilm.train.talker  # noqa: F401
    import omnilm.train.token2wav  # noqa: F401


# ---------------------------------------------------------------------------------------------- shared parts


def build_model(config: StageConfig, tokenizer: Any, resume_from: Path | None, seed: int) -> nn.Module:
    """The stage's starting model: a checkpoint being resumed, the ``init_from`` folder, or a fresh init."""
    from omnilm.model.config import load_model_config
    from omnilm.model.hf import load_pretrained
    from omnilm.model.transformer import Transformer

    if config.lora:
        from omnilm.adapters.stage import with_lora

        if config.train.distributed == "fsdp":
            raise ConfigError(f"stage {config.name!r}: LoRA trains with one process or DDP, not FSDP")
        # The frozen base is always the starting model; resuming restores the adapters from the checkpoint.
        base = build_model(dataclasses.replace(config, lora=None), tokenizer, None, seed)
        try:
            return with_lora(base, config.lora, config.init_from, seed)
        except ConfigError as err:
            raise ConfigError(f"stage {config.name!r}: {err}") from None
    if resume_from is not None:
        return load_pretrained(resume_from, dtype=torch.float32)
    if config.init_from:
        model = load_pretrained(config.init_from, dtype=torch.float32)
        if config.model:
            from omnilm.model.context import with_context

            try:
                model = with_context(model, dict(config.model))
            except ConfigError as err:
                raise ConfigError(f"stage {config.name!r}: model (with init_from): {err}") from None
        return model
    if not config.model:
        raise ConfigError(f"stage {config.name!r}: set either model (a fresh model) or init_from (a model folder)")
    overrides = {"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id,
                 "pad_token_id": tokenizer.pad_id}
    model_config = load_model_config(dict(config.model) | overrides)
    if model_config.max_seq_len < config.train.seq_len:
        raise ConfigError(f"stage {config.name!r}: train.seq_len={config.train.seq_len} exceeds the model's "
                          f"max_seq_len={model_config.max_seq_len}")
    torch.manual_seed(seed)
    return Transformer(model_config)


def stage_setup(config: StageConfig, out_dir: Path, resume: bool,
                build: Callable[[StageConfig, Any, Path | None, int], nn.Module] | None = None) -> tuple[Any, ...]:
    """What every stage starts with: device, process group, tokenizer, the latest checkpoint when resuming and
    the starting model (made by ``build``, with ``build_model``'s arguments: a stage whose model is no plain LM
    passes its own)."""
    if not config.data:
        raise ConfigError(f"stage {config.name!r}: no data sources")
    from omnilm.train.checkpoint import latest_checkpoint
    from omnilm.train.distributed import init_distributed
    from omnilm.train.trainer import resolve_device

    device = resolve_device(config.train.device)
    info = init_distributed(device.type)
    tokenizer = load_tokenizer(config)
    resume_from = latest_checkpoint(out_dir / "checkpoints") if resume else None
    model = (build or build_model)(config, tokenizer, resume_from, config.train.seed).to(device)
    return device, info, tokenizer, model, resume_from


def frozen_reference(folder: str | Path, device: torch.device) -> nn.Module:
    """A fixed model (a reference policy, a teacher): loaded from ``folder`` in eval mode, without gradients."""
    from omnilm.model.hf import load_pretrained

    reference = load_pretrained(folder, dtype=torch.float32).to(device).eval()
    reference.requires_grad_(False)
    return reference


def stage_options(config: StageConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """``config.options`` over ``defaults``; an option the stage type does not know is an error."""
    unknown = sorted(set(config.options) - set(defaults))
    if unknown:
        raise ConfigError(f"stage {config.name!r}: unknown option(s) {unknown}; known: {sorted(defaults)}")
    return defaults | config.options


def load_tokenizer(config: StageConfig) -> Any:
    from omnilm.tokenizer import Tokenizer

    folder = config.tokenizer or config.init_from
    if folder is None:
        raise ConfigError(f"stage {config.name!r}: no tokenizer (set tokenizer: or init_from:)")
    return Tokenizer.from_dir(folder)


def greedy_sampler(tokenizer: Any, prompt: str, max_new_tokens: int, chat: bool = False,
                   ) -> Callable[[nn.Module], str]:
    """A function that continues ``prompt`` greedily with a model (for periodic samples); with ``chat`` the
    prompt is a user turn and the reply ends at ``<|im_end|>``."""
    from omnilm.infer.generate import generate_ids
    from omnilm.infer.sampling import SamplingParams
    from omnilm.tokenizer.chat import IM_END, encode_chat

    if chat:
        prompt_ids, _ = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        prompt_ids = tokenizer.encode(prompt)
    stops = [tokenizer.eos_id] + ([tokenizer.token_to_id(IM_END)] if chat else [])
    eos = [t for t in stops if t is not None]

    def sample(model: nn.Module) -> str:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        steps = [int(t[0]) for t in generate_ids(model, [prompt_ids], params, eos, tokenizer.pad_id or 0)]
        return tokenizer.decode([t for t in steps if t >= 0 and t not in eos])

    return sample
