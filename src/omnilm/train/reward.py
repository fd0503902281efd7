"""Reward-model training (stage type ``reward``): a scalar head on a Transformer, fit to preference pairs.

Data: the preference records of DPO (``prompt``, ``chosen``, ``rejected``). The model scores each whole
conversation at its last token and is trained with the Bradley–Terry loss −log σ(r_chosen − r_rejected).
It starts from ``init_from`` (a causal LM, whose head is then freshly initialised, or a reward folder) or from
a fresh ``model:``. The final folder is a reward model in the Hugging Face sequence-classification layout
(see ``omnilm.model.reward``). Options:

``val_fraction`` (0.1)   share of pairs held out (chosen by a hash of their file:line, so the split does not
                         move with the seed or the order of sources); their pairwise accuracy and loss are
                         the stage's evaluation (``val_accuracy``, ``val_loss``)
``strict`` (false)       a bad record fails the run instead of being skipped and reported
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.train.distributed import wrap_model
from omnilm.train.dpo import preference_pairs
from omnilm.train.sft import padding_id
from omnilm.train.stage import StageConfig, build_model, register_stage, stage_options, stage_setup
from omnilm.train.trainer import Trainer, TrainResult

if TYPE_CHECKING:
    from omnilm.data.chat_data import PreferenceExample
    from omnilm.model.reward import RewardModel

REWARD_OPTIONS = {"val_fraction": 0.1, "strict": False}


def split_pairs(pairs: Sequence[PreferenceExample], val_fraction: float,
                ) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, held-out) pairs: the ``val_fraction`` share with the smallest hash of their record location."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"options.val_fraction must lie in [0, 1), got {val_fraction}")
    held = round(val_fraction * len(pairs))
    ranked = sorted(range(len(pairs)), key=lambda i: (zlib.crc32(pairs[i].chosen.where.encode()), i))
    val = set(ranked[:held])
    return [p for i, p in enumerate(pairs) if i not in val], [pairs[i] for i in sorted(val)]


def pair_batch(pairs: Sequence[PreferenceExample], pad: int) -> dict[str, torch.Tensor]:
    """The chosen then the rejected conversations of ``pairs``, right-padded, with their attention mask."""
    from omnilm.data.examples import pad_right

    rows = [p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs]
    return {"tokens": pad_right(rows, pad), "attention_mask": pad_right([[1] * len(r) for r in rows], 0)}


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (B,) of the chosen and of the rejected halves of a ``pair_batch``."""
    rewards = model(batch["tokens"], batch["attention_mask"]).float()
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:]


def bradley_terry_objective(model: nn.Module, batch: dict[str, torch.Tensor],
                            ) -> tuple[torch.Tensor, dict[str, float]]:
    """The trainer objective: Bradley–Terry loss of a ``pair_batch``; logs train ``accuracy`` and ``margin``."""
    from omnilm.objectives.preference import bradley_terry_loss

    return bradley_terry_loss(*pair_rewards(model, batch))


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: Sequence[PreferenceExample], pad: int, batch_size: int,
                   ) -> dict[str, float]:
    """Pairwise accuracy (share of pairs with r_chosen > r_rejected) and mean Bradley–Terry loss over ``pairs``."""
    from omnilm.objectives.preference import bradley_terry_loss

    device = next(model.parameters()).device
    correct, loss = 0.0, 0.0
    for begin in range(0, len(pairs), batch_size):
        chunk = pairs[begin:begin + batch_size]
        batch = {k: v.to(device) for k, v in pair_batch(chunk, pad).items()}
        chunk_loss, metrics = bradley_terry_loss(*pair_rewards(model, batch))
        correct += metrics["accuracy"] * len(chunk)
        loss += float(chunk_loss) * len(chunk)
    return {"val_accuracy": correct / len(pairs), "val_loss": loss / len(pairs)}


def build_reward_model(config: StageConfig, tokenizer: Any, resume_from: Path | None, seed: int) -> RewardModel:
    """The starting reward model: a checkpoint being resumed, ``init_from`` (reward or causal-LM folder), or a
    fresh ``model:`` with a fresh head."""
    from omnilm.model.reward import RewardModel

    if resume_from is not None:
        return RewardModel.from_pretrained(resume_from)
    if config.init_from:
        torch.manual_seed(seed)  # a causal-LM folder gets a fresh head: make it the same in every run
        return RewardModel.from_pretrained(config.init_from)
    return RewardModel(build_model(config, tokenizer, None, seed))


@register_stage("reward")
def run_reward_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.data.examples import ExampleLoader

    options = stage_options(config, REWARD_OPTIONS)
    train = config.train
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume,
                                                                      build=build_reward_model)
    pairs, held_out = split_pairs(preference_pairs(config, tokenizer, bool(options["strict"]), info),
                                  float(options["val_fraction"]))
    if info.is_main:
        print(f"[{config.name}] {len(pairs):,} training pairs, {len(held_out):,} held out")
    pad = padding_id(tokenizer)
    loader = ExampleLoader(len(pairs), train.batch_size, lambda indices: pair_batch([pairs[i] for i in indices], pad),
                           seed=train.seed, rank=info.rank, world_size=info.world_size)
    evaluate = (lambda m: evaluate_pairs(m, held_out, pad, train.batch_size)) if held_out else None
    model = wrap_model(model, train.distributed, info, device)
    mean_len = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs) / max(len(pairs), 1)
    trainer = Trainer(model, bradley_terry_objective, loader, train, out_dir, info=info, tokenizer=tokenizer,
                      evaluate=evaluate, tokens_per_batch=round(mean_len * train.batch_size))
    return trainer.fit(resume=resume_from is not None)
