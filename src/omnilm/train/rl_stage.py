"""What the RL stages (``grpo``, ``ppo``) share: options, setup, per-step metrics, training and the RL plot.

Both start from ``init_from`` (the policy to train, also loaded a second time as the frozen reference), read
prompts from chat records (see ``omnilm.train.rollout``), sample their own training data each step and write
``rl.png`` (reward, KL, entropy, response length against the step) beside ``loss.png`` at the end.
Sampling needs the whole policy on every process, so they run single-process or under DDP, not FSDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.data.sources import ReadReport
from omnilm.infer.sampling import SamplingParams
from omnilm.objectives.logprobs import entropy_from_logits, masked_mean, token_logprobs
from omnilm.objectives.rl import k3_kl
from omnilm.train.distributed import Dist, wrap_model
from omnilm.train.rollout import RolloutPrompt, load_prompts
from omnilm.train.sft import print_read_report
from omnilm.train.stage import StageConfig, build_model, frozen_reference, greedy_sampler, stage_setup
from omnilm.train.trainer import BatchSource, Objective, Trainer, TrainResult, autocast_dtype

#: Options every RL stage has (``options:`` of the stage).
RL_OPTIONS: dict[str, Any] = {"group_size": 8, "max_new_tokens": 32, "temperature": 1.0, "kl_coef": 0.04,
                              "clip": 0.2, "reward": "qa", "strict": False}


@dataclass
class RLSetup:
    """The parts of an RL stage before its objective: process, tokenizer, models, prompts, sampling."""

    device: torch.device
    info: Dist
    tokenizer: Any
    #: The model the trainer updates (the policy, or the policy with a value head).
    model: nn.Module
    resume_from: Path | None
    reference: nn.Module
    prompts: list[RolloutPrompt]
    params: SamplingParams

    def tokens_per_batch(self, batch_size: int, group_size: int) -> int:
        """An upper estimate of the tokens of one micro-batch (every response at its longest), for throughput."""
        mean_prompt = sum(len(p.ids) for p in self.prompts) / max(len(self.prompts), 1)
        return round((mean_prompt + self.params.max_new_tokens) * batch_size * group_size)


def check_rl_options(config: StageConfig, options: dict[str, Any]) -> None:
    """Fail early, before any model is loaded, on options an RL stage cannot run with."""
    where = f"stage {config.name!r}"
    if not config.init_from:
        raise ConfigError(f"{where}: {config.type} needs init_from (the policy to train and its reference)")
    if int(options["group_size"]) < 1 or int(options["max_new_tokens"]) < 1:
        raise ConfigError(f"{where}: group_size and max_new_tokens must be at least 1")
    if float(options["temperature"]) <= 0:
        raise ConfigError(f"{where}: temperature must be > 0 (RL learns from differences between samples)")
    if int(options["max_new_tokens"]) >= config.train.seq_len:
        raise ConfigError(f"{where}: max_new_tokens={options['max_new_tokens']} leaves no room for a prompt "
                          f"within train.seq_len={config.train.seq_len}")


def setup_rl_stage(config: StageConfig, out_dir: Path, resume: bool, options: dict[str, Any], need_answer: bool,
                   build: Callable[..., nn.Module] = build_model) -> RLSetup:
    """Process group, tokenizer, the model to train (made by ``build``), the frozen reference and the prompts."""
    device, info, tokenizer, model, resume_from = stage_setup(config, out_dir, resume, build)
    if info.enabled and config.train.distributed == "fsdp":
        raise ConfigError(f"stage {config.name!r}: {config.type} samples with the whole policy on every process; "
                          "use train.distributed: ddp")
    reference = frozen_reference(config.init_from, device)
    max_new = int(options["max_new_tokens"])
    report = ReadReport()
    prompts: list[RolloutPrompt] = []
    for source in config.data.values():
        prompts += load_prompts([source.path], tokenizer, config.train.seq_len - max_new, source.where,
                                strict=bool(options["strict"]), report=report, need_answer=need_answer)
    if info.is_main:
        print_read_report(config.name, report, len(prompts))
    params = SamplingParams(max_new_tokens=max_new, temperature=float(options["temperature"]))
    return RLSetup(device, info, tokenizer, model, resume_from, reference, prompts, params)


def autocast_for(config: StageConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The trainer's autocast, for the no-grad passes over a rollout: log-probabilities computed there and in the
    loss then agree, so the probability ratio starts at exactly 1."""
    dtype = autocast_dtype(config.train.precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T−1, V), log-probabilities (B, T−1)) of each next token of ``tokens`` given the model's
    logits (B, T, V); column j scores token j+1, so input-aligned masks apply as ``mask[:, 1:]``."""
    logits = logits[:, :-1]
    return logits, token_logprobs(logits, tokens[:, 1:])


def policy_logprobs(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`next_token_logprobs` of a causal LM's forward pass over ``tokens``."""
    return next_token_logprobs(model(tokens), tokens)


@torch.no_grad()
def rollout_metrics(logits: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    scores: torch.Tensor) -> dict[str, float]:
    """What an RL step logs about its samples: mean ``reward``, ``kl`` (mean per-token k3 estimate of
    KL(π ‖ π_ref)), ``entropy`` (mean over response tokens) and mean ``response_length`` (tokens)."""
    valid = mask.bool()
    entropy = entropy_from_logits(logits.detach()[valid]).mean() if bool(valid.any()) else torch.zeros(())
    return {"reward": float(scores.float().mean()), "kl": float(masked_mean(k3_kl(logprobs.detach(), ref_logprobs),
                                                                           mask)),
            "entropy": float(entropy), "response_length": float(mask.sum(-1).float().mean())}


def fit_rl_stage(config: StageConfig, out_dir: Path, setup: RLSetup, objective: Objective, source: BatchSource,
                 tokens_per_batch: int, policy_of: Callable[[nn.Module], nn.Module] = lambda m: m) -> TrainResult:
    """Train ``setup.model`` on ``source``'s rollouts, then plot the RL curves into ``rl.png``.

    ``policy_of`` finds the causal LM inside the trained model (for the periodic greedy samples).
    """
    from omnilm.eval.plots import plot_rl_curves

    train, info = config.train, setup.info
    model = wrap_model(setup.model, train.distributed, info, setup.device)
    sample = None
    if train.sample_prompt:
        greedy = greedy_sampler(setup.tokenizer, train.sample_prompt, train.sample_tokens, chat=True)

        def sample(trained: nn.Module) -> str:
            return greedy(policy_of(trained))

    trainer = Trainer(model, objective, source, train, out_dir, info=info, tokenizer=setup.tokenizer,
                      sample=sample, tokens_per_batch=tokens_per_batch)
    result = trainer.fit(resume=setup.resume_from is not None)
    if info.is_main and result.status == "complete":
        plot_rl_curves(trainer.metrics_path, out_dir / "rl.png")
    return result
