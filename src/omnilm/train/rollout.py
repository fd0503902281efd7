"""Rollouts for RL fine-tuning (stage types ``grpo`` and ``ppo``): prompts, sampled completions, rewards.

A prompt is a chat record's conversation without its final assistant message, rendered with the generation
prompt. Every micro-batch, :class:`RolloutSource` takes the next prompts from an ``ExampleLoader``, samples
``group_size`` completions of each from the current policy, scores them, and hands the rows to a
stage-specific ``prepare`` that adds what the loss needs (computed without gradients: reference
log-probabilities, values, advantages). Sampling is seeded by the rollout's index, so a run resumed from a
checkpoint samples exactly what the uninterrupted run would have.

Rows are prompt + response, right-padded (no attention mask is needed under causal attention). The response
mask is 1 on exactly the sampled tokens, the stop token (``<|im_end|>`` or EOS) included, so the policy learns
where to stop; prompt and padding are 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from omnilm.config import ConfigError
from omnilm.data.chat_data import read_records, record_messages
from omnilm.data.examples import ExampleLoader, pad_right
from omnilm.data.sources import ReadReport
from omnilm.errors import UserError
from omnilm.infer.generate import FINISHED, generate_ids
from omnilm.infer.sampling import SamplingParams
from omnilm.tokenizer.chat import IM_END, encode_chat
from omnilm.train.sft import padding_id


@dataclass(frozen=True)
class RolloutPrompt:
    """A tokenised prompt and the record's reference ``answer`` (None when it has none)."""

    ids: list[int]
    answer: Any
    where: str


@dataclass
class Rollout:
    """One micro-batch of sampled completions: ``group_size`` consecutive rows per prompt."""

    #: (N, L) prompt + response ids, right-padded.
    tokens: torch.Tensor
    #: (N, L) 1 on prompt and response tokens, 0 on padding.
    attention_mask: torch.Tensor
    #: (N, L) 1 on the sampled response tokens (stop token included).
    response_mask: torch.Tensor
    prompts: list[RolloutPrompt]
    #: Decoded responses, stop token removed.
    texts: list[str]
    #: (N,) sequence rewards, filled in by the scorer.
    scores: torch.Tensor | None = None


Scorer = Callable[[Rollout], torch.Tensor]
Prepare = Callable[[Rollout], dict[str, Any]]


def prompt_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation of a chat record without its final assistant message (the part the policy answers)."""
    messages = record_messages(record)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise UserError("record has no prompt before its assistant message")
    return messages


def load_prompts(paths: Sequence[str], tokenizer: Any, max_prompt_len: int, where: dict[str, Any] | None = None,
                 strict: bool = False, report: ReadReport | None = None,
                 need_answer: bool = False) -> list[RolloutPrompt]:
    """Tokenised prompts of the chat records in ``paths``; a bad or too long one is skipped (fatal when strict).

    ``need_answer``: a record without an ``answer`` field is bad (a checker reward compares against it).
    """
    report = report if report is not None else ReadReport()
    prompts = []
    for record, location in read_records(paths, where, strict, report):
        try:
            ids, _ = encode_chat(tokenizer, prompt_messages(record), add_generation_prompt=True)
            if len(ids) > max_prompt_len:
                raise UserError(f"prompt of {len(ids)} tokens leaves no room for the response "
                                f"(at most {max_prompt_len} prompt tokens)")
            if need_answer and record.get("answer") is None:
                raise UserError("record has no answer for the checker reward")
            prompts.append(RolloutPrompt(ids, record.get("answer"), location))
        except UserError as err:
            report.skip(location, str(err), strict)
    return prompts


# ---------------------------------------------------------------------------------------------- rewards


def _arithmetic(response: str, answer: Any) -> bool:
    from omnilm.data.synth.arithmetic import is_correct

    return is_correct(response, int(answer))


def _qa(response: str, answer: Any) -> bool:
    from omnilm.data.synth.bios import answer_matches

    return answer_matches(response, str(answer))


#: Verifiable rewards: does a response state the record's ``answer``?
CHECKERS: dict[str, Callable[[str, Any], bool]] = {"arithmetic": _arithmetic, "qa": _qa}


def checker_scorer(kind: str) -> Scorer:
    """Rewards 1.0 / 0.0 from the ``kind`` checker (``arithmetic`` or ``qa``) against each prompt's answer."""
    if kind not in CHECKERS:
        raise ConfigError(f"unknown reward {kind!r}; known: {', '.join(sorted(CHECKERS))}")
    check = CHECKERS[kind]

    def score(rollout: Rollout) -> torch.Tensor:
        return torch.tensor([float(check(text, prompt.answer))
                             for text, prompt in zip(rollout.texts, rollout.prompts, strict=True)])

    return score


# ---------------------------------------------------------------------------------------------- sampling


def stop_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a response: ``<|im_end|>`` (the end of a chat turn) and EOS."""
    return [t for t in (tokenizer.token_to_id(IM_END), tokenizer.eos_id) if t is not None]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block (no dropout while sampling and scoring), the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sample_responses(policy: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams,
                     stops: Sequence[int], pad_id: int) -> list[list[int]]:
    """The sampled tokens of each prompt, up to and including its stop token (or ``max_new_tokens`` of them)."""
    responses: list[list[int]] = [[] for _ in prompts]
    with eval_mode(policy):
        for tokens in generate_ids(policy, prompts, params, stops, pad_id):
            for row, token in enumerate(tokens.tolist()):
                if token != FINISHED:
                    responses[row].append(token)
    return responses


def rollout_tensors(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, attention_mask, response_mask), each (N, L): prompt + response rows, right-padded."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    attention = [[1] * len(row) for row in rows]
    response = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses, strict=True)]
    return pad_right(rows, pad_id), pad_right(attention, 0), pad_right(response, 0)


def rollout_seed(seed: int, index: int, rank: int) -> int:
    """A sampling seed per (run seed, rollout index, rank): reproducible, and different on every rank."""
    return int(np.random.SeedSequence([seed, index, rank]).generate_state(1)[0])


class RolloutSource:
    """The batches of an RL stage: each one a freshly sampled, scored and prepared rollout.

    ``policy`` is the (unwrapped) causal LM being trained; ``loader`` yields lists of prompt indices.
    With ``epochs`` > 1 (PPO), every ``micro_batches`` rollouts are reused ``epochs`` times before new ones are
    sampled, their ``prepare``d old log-probabilities staying those of the policy that sampled them.
    """

    def __init__(self, policy: nn.Module, tokenizer: Any, prompts: Sequence[RolloutPrompt], loader: ExampleLoader,
                 params: SamplingParams, group_size: int, score: Scorer, prepare: Prepare, seed: int = 0,
                 rank: int = 0, epochs: int = 1, micro_batches: int = 1) -> None:
        if group_size < 1 or epochs < 1:
            raise ConfigError("group_size and epochs must be at least 1")
        self.policy, self.tokenizer, self.prompts, self.loader = policy, tokenizer, prompts, loader
        self.params, self.group_size, self.score, self.prepare = params, group_size, score, prepare
        self.seed, self.rank, self.epochs, self.micro_batches = seed, rank, epochs, micro_batches
        self.stops = stop_ids(tokenizer)
        self.pad_id = padding_id(tokenizer)
        self.calls = 0
        self._reused: dict[int, dict[str, Any]] = {}

    def sample(self, index: int) -> Rollout:
        """Sample and score rollout ``index`` on the next prompts of the loader."""
        chosen = [self.prompts[i] for i in self.loader.next_batch() for _ in range(self.group_size)]
        ids = [p.ids for p in chosen]
        params = dataclasses.replace(self.params, seed=rollout_seed(self.seed, index, self.rank))
        responses = sample_responses(self.policy, ids, params, self.stops, self.pad_id)
        texts = [self.tokenizer.decode([t for t in r if t not in self.stops]) for r in responses]
        device = next(self.policy.parameters()).device
        tokens, attention, response = (t.to(device) for t in rollout_tensors(ids, responses, self.pad_id))
        rollout = Rollout(tokens, attention, response, chosen, texts)
        rollout.scores = self.score(rollout).float().to(device)
        return rollout

    def next_batch(self) -> dict[str, Any]:
        micro = self.calls % self.micro_batches
        fresh = self.calls % (self.micro_batches * self.epochs) < self.micro_batches
        # After a resume in the middle of a rollout's epochs the rollout is gone: sample a new one.
        if fresh or micro not in self._reused:
            with torch.no_grad(), eval_mode(self.policy):
                self._reused[micro] = self.prepare(self.sample(self.calls))
        self.calls += 1
        return self._reused[micro]

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.calls = int(state["calls"])
        self._reused.clear()
