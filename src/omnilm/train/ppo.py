"""PPO for RLHF (stage type ``ppo``): a policy with a value head, a KL-shaped reward, GAE and clipped losses.

Each step samples ``group_size`` completions for each of ``train.batch_size`` prompts and scores every
completion once: with a reward model (``reward_model``: a folder ``omnilm.model.reward.RewardModel`` loads,
sharing the policy's tokenizer), or with a checker (``reward``: ``qa`` / ``arithmetic``, 1.0 when the response
states the record's ``answer``). Per-token rewards are −β·(log π − log π_ref) with the score added on the last
response token (``kl_penalty_rewards``); GAE turns them and the rollout's values into advantages (whitened over
the batch) and returns. The loss is the clipped surrogate plus ``vf_coef`` × the clipped value loss.
Options (``options:`` of the stage):

``reward_model`` (none)     reward-model folder; exactly one of reward_model and reward is set
``reward`` (none)           checker reward instead of a reward model: ``qa`` or ``arithmetic``
``group_size`` (1)          completions sampled per prompt
``max_new_tokens`` (32)     longest completion; it ends earlier at ``<|im_end|>`` or EOS
``temperature`` (1.0)       sampling temperature
``kl_coef`` (0.05)          β of the per-token KL penalty
``clip`` (0.2)              clip range of the probability ratio
``value_clip`` (0.2)        clip range of the value update
``vf_coef`` (0.1)           weight of the value loss
``gamma`` (1.0), ``lam`` (0.95)  GAE discount and λ
``ppo_epochs`` (1)          updates per rollout (see below)
``strict`` (false)          a bad record fails the run instead of being skipped and reported

The value head shares the policy's backbone (see ``omnilm.train.value_head``) and is trained with it. The
final model folder is the policy as a plain causal LM, with ``value_head.safetensors`` beside its weights.

``ppo_epochs``: with the default 1, each rollout is used for one update by the parameters that sampled it, so
the ratio is exactly 1 and the clip never binds. With E > 1, the step's rollouts are reused for E consecutive
optimizer steps, keeping the old log-probabilities and values of the policy that sampled them, as in PPO. A
run resumed in the middle of those E steps samples a fresh rollout for the steps that remain.
Logged per step: ``reward`` (mean score), ``kl``, ``entropy``, ``response_length``, ``clipfrac``,
``approx_kl``, ``policy_loss``, ``value_loss``, ``value_clipfrac``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.data.examples import ExampleLoader
from omnilm.objectives.logprobs import masked_mean
from omnilm.objectives.rl import gae, kl_penalty_rewards, masked_whiten, ppo_policy_loss, ppo_value_loss
from omnilm.train.distributed import unwrap
from omnilm.train.rl_stage import (
    RL_OPTIONS,
    autocast_for,
    check_rl_options,
    fit_rl_stage,
    next_token_logprobs,
    policy_logprobs,
    rollout_metrics,
    setup_rl_stage,
)
from omnilm.train.rollout import Rollout, RolloutSource, Scorer, checker_scorer
from omnilm.train.stage import StageConfig, build_model, register_stage, stage_options
from omnilm.train.trainer import TrainResult
from omnilm.train.value_head import PolicyWithValueHead

PPO_OPTIONS = RL_OPTIONS | {"reward": None, "reward_model": None, "group_size": 1, "kl_coef": 0.05,
                            "value_clip": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "ppo_epochs": 1}


def reward_model_scorer(folder: str, config: StageConfig, device: torch.device) -> Scorer:
    """Scores from the reward model in ``folder``: its scalar on each (prompt + response) row's last token."""
    from omnilm.model.reward import RewardModel

    reward_model = RewardModel.from_pretrained(folder).to(device).eval()
    reward_model.requires_grad_(False)

    def score(rollout: Rollout) -> torch.Tensor:
        with torch.no_grad(), autocast_for(config, device):
            return reward_model(rollout.tokens, rollout.attention_mask).float()

    return score


def check_reward_options(config: StageConfig, options: dict[str, Any]) -> None:
    """Exactly one scorer, and a reward model folder that exists."""
    where = f"stage {config.name!r}"
    if (options["reward_model"] is None) == (options["reward"] is None):
        raise ConfigError(f"{where}: ppo needs exactly one of options.reward_model (a reward-model folder) and "
                          "options.reward (a checker: qa or arithmetic)")
    if options["reward_model"] is not None:
        from omnilm.model.reward import is_reward_folder

        folder = Path(options["reward_model"])
        if not folder.is_dir():
            raise ConfigError(f"{where}: options.reward_model: folder not found: {folder}")
        # A causal-LM folder would load with a random scoring head: rewards that mean nothing.
        if not is_reward_folder(folder):
            raise ConfigError(f"{where}: options.reward_model: {folder} is not a reward-model folder "
                              "(train one with a stage of type reward)")
    if options["reward"] is not None:
        try:
            checker_scorer(str(options["reward"]))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    if int(options["ppo_epochs"]) < 1:
        raise ConfigError(f"{where}: ppo_epochs must be at least 1")


@register_stage("ppo")
def run_ppo_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    options = stage_options(config, PPO_OPTIONS)
    check_rl_options(config, options)
    check_reward_options(config, options)
    group_size, kl_coef = int(options["group_size"]), float(options["kl_coef"])
    clip, value_clip, vf_coef = float(options["clip"]), float(options["value_clip"]), float(options["vf_coef"])
    gamma, lam = float(options["gamma"]), float(options["lam"])
    train = config.train

    def build(*args: Any) -> nn.Module:
        return PolicyWithValueHead(build_model(*args))

    checker = options["reward"] is not None
    setup = setup_rl_stage(config, out_dir, resume, options, need_answer=checker, build=build)
    model, reference, device = setup.model, setup.reference, setup.device
    score = checker_scorer(str(options["reward"])) if checker else \
        reward_model_scorer(str(options["reward_model"]), config, device)

    def prepare(rollout: Rollout) -> dict[str, Any]:
        tokens, mask = rollout.tokens, rollout.response_mask[:, 1:]
        with autocast_for(config, device):
            logits, values = model(tokens)
            _, old_logprobs = next_token_logprobs(logits, tokens)
            _, ref_logprobs = policy_logprobs(reference, tokens)
        # Position t's value estimates the return of the response from token t+1 on, like its log-probability.
        values = values[:, :-1].float()
        rewards = kl_penalty_rewards(rollout.scores, old_logprobs, ref_logprobs, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
        return {"tokens": tokens, "response_mask": rollout.response_mask, "old_logprobs": old_logprobs.float(),
                "ref_logprobs": ref_logprobs.float(), "old_values": values, "returns": returns,
                "advantages": masked_whiten(advantages, mask), "scores": rollout.scores}

    def objective(trained: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, mask = batch["tokens"], batch["response_mask"][:, 1:]
        all_logits, values = trained(tokens)
        logits, logprobs = next_token_logprobs(all_logits, tokens)
        policy_loss, policy_stats = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                                    clip=clip)
        value_loss, value_stats = ppo_value_loss(values[:, :-1].float(), batch["old_values"], batch["returns"],
                                                 mask, clip=value_clip)
        metrics = rollout_metrics(logits, logprobs, batch["ref_logprobs"], mask, batch["scores"])
        return policy_loss + vf_coef * value_loss, metrics | {
            "clipfrac": policy_stats["clipfrac"], "approx_kl": policy_stats["approx_kl"],
            "policy_loss": float(policy_loss.detach()), "value_loss": float(value_loss.detach()),
            "value_clipfrac": value_stats["clipfrac"],
            "value_mean": float(masked_mean(values[:, :-1].detach().float(), mask))}

    info = setup.info
    loader = ExampleLoader(len(setup.prompts), train.batch_size, list, seed=train.seed, rank=info.rank,
                           world_size=info.world_size)
    source = RolloutSource(model.policy, setup.tokenizer, setup.prompts, loader, setup.params, group_size, score,
                           prepare, seed=train.seed, rank=info.rank, epochs=int(options["ppo_epochs"]),
                           micro_batches=train.accumulation(info.world_size))
    return fit_rl_stage(config, out_dir, setup, objective, source,
                        setup.tokens_per_batch(train.batch_size, group_size),
                        policy_of=lambda trained: unwrap(trained).policy)
