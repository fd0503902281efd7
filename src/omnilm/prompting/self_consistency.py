"""Self-consistency (Wang et al., 2023): sample k replies, answer with the most frequent final answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from omnilm.infer.sampling import SamplingParams
from omnilm.prompting.answers import AnswerReader, Vote, majority_vote
from omnilm.prompting.responder import Responder


@dataclass
class Consensus:
    """Every sampled reply, the answer each states (None: none), the vote, and the reply that shows the winner."""

    replies: list[str]
    answers: list[str | None]
    vote: Vote

    @property
    def reply(self) -> str:
        """The first reply stating the winning answer (the first reply when none states an answer)."""
        return self.replies[self.vote.first if self.vote.first is not None else 0]


def sample_replies(responder: Responder, messages: Sequence[dict[str, str]], k: int, params: SamplingParams,
                   seed: int = 0) -> list[str]:
    """``k`` replies to one prompt in one batched generation; reply i is drawn with its own generator seeded
    ``seed + i``, so it equals what the prompt alone would give with that seed."""
    if k < 1:
        raise ValueError(f"self-consistency needs k >= 1 samples, got {k}")
    if k > 1 and params.greedy:
        raise ValueError("self-consistency samples: temperature must be > 0 (greedy replies would all agree)")
    return responder.replies([messages] * k, params, seeds=[seed + i for i in range(k)])


def self_consistency(responder: Responder, messages: Sequence[dict[str, str]], k: int, params: SamplingParams,
                     reader: AnswerReader | None = None, seed: int = 0) -> Consensus:
    """Sample ``k`` replies (``sample_replies``) and vote on the answers ``reader`` reads from them."""
    reader = reader or AnswerReader()
    replies = sample_replies(responder, messages, k, params, seed)
    answers = [reader(r) for r in replies]
    return Consensus(replies, answers, majority_vote(answers))
