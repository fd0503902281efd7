"""Group relative policy optimisation (stage type ``grpo``) with verifiable rewards.

Each step samples ``group_size`` completions for each of ``train.batch_size`` prompts, rewards each one 1.0 when
it states its record's ``answer`` and 0.0 otherwise, and gives every token of a completion the completion's
reward relative to its group (``grpo_advantages``): no value model is needed. A k3 KL penalty keeps the policy
near the frozen starting model (``grpo_loss``). Options (``options:`` of the stage):

``group_size`` (8)          completions sampled per prompt
``max_new_tokens`` (32)     longest completion; it ends earlier at ``<|im_end|>`` or EOS
``temperature`` (1.0)       sampling temperature
``kl_coef`` (0.04)          weight β of the KL penalty
``clip`` (0.2)              PPO clip range ε of the probability ratio
``reward`` (qa)             the checker: ``qa`` (bios QA answers) or ``arithmetic`` (``The answer is N``)
``strict`` (false)          a bad record fails the run instead of being skipped and reported

One policy update per rollout: a rollout is sampled by the very parameters it then updates, once, so the
"old" log-probabilities of the clipped surrogate are the detached current ones. The ratio is therefore exactly
1 (its gradient is still the policy gradient) and the clip never binds: ``clipfrac`` logs 0. Reusing rollouts
for several updates is what ``ppo``'s ``ppo_epochs`` does. Logged per step: ``reward``, ``kl``, ``entropy``,
``response_length``, ``clipfrac``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.data.examples import ExampleLoader
from omnilm.objectives.rl import grpo_advantages, grpo_loss
from omnilm.train.distributed import unwrap
from omnilm.train.rl_stage import (
    RL_OPTIONS,
    autocast_for,
    check_rl_options,
    fit_rl_stage,
    policy_logprobs,
    rollout_metrics,
    setup_rl_stage,
)
from omnilm.train.rollout import Rollout, RolloutSource, checker_scorer
from omnilm.train.stage import StageConfig, register_stage, stage_options
from omnilm.train.trainer import TrainResult


@register_stage("grpo")
def run_grpo_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    options = stage_options(config, RL_OPTIONS)
    check_rl_options(config, options)
    try:
        score = checker_scorer(str(options["reward"]))
    except ConfigError as err:
        raise ConfigError(f"stage {config.name!r}: {err}") from None
    group_size, clip, kl_coef = int(options["group_size"]), float(options["clip"]), float(options["kl_coef"])
    train = config.train
    setup = setup_rl_stage(config, out_dir, resume, options, need_answer=True)
    reference = setup.reference

    def prepare(rollout: Rollout) -> dict[str, Any]:
        with autocast_for(config, setup.device):
            _, ref_logprobs = policy_logprobs(reference, rollout.tokens)
        return {"tokens": rollout.tokens, "response_mask": rollout.response_mask,
                "ref_logprobs": ref_logprobs.float(), "advantages": grpo_advantages(rollout.scores, group_size),
                "scores": rollout.scores}

    def objective(policy: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["response_mask"][:, 1:]
        logits, logprobs = policy_logprobs(policy, batch["tokens"])
        loss, stats = grpo_loss(logprobs, logprobs.detach(), batch["ref_logprobs"], batch["advantages"], mask,
                                clip=clip, kl_coef=kl_coef)
        metrics = rollout_metrics(logits, logprobs, batch["ref_logprobs"], mask, batch["scores"])
        return loss, metrics | {"clipfrac": stats["clipfrac"]}

    info = setup.info
    loader = ExampleLoader(len(setup.prompts), train.batch_size, list, seed=train.seed, rank=info.rank,
                           world_size=info.world_size)
    source = RolloutSource(unwrap(setup.model), setup.tokenizer, setup.prompts, loader, setup.params, group_size,
                           score, prepare, seed=train.seed, rank=info.rank)
    return fit_rl_stage(config, out_dir, setup, objective, source,
                        setup.tokens_per_batch(train.batch_size, group_size))
