"""The named prompting strategies and the prompts they give a list of questions.

===================  ==========================================================================================
``greedy``           the question alone, greedy reply (the direct answer)
``cot``              zero-shot chain of thought: the question + "Let's think step by step.", greedy
``self-consistency`` the ``cot`` prompt, ``samples`` replies at ``temperature``, majority vote on the answers
``few-shot``         ``shots`` demonstrations (question + trigger → worked reply) from the training pool: the
                     pool questions most similar to the question (``retrieved``, by the model's own embeddings)
                     or the first ``shots`` of the pool (``chosen``); then the ``cot`` prompt, greedy
``auto-cot``         Auto-CoT demonstrations (:mod:`omnilm.prompting.auto_cot`, one per cluster of the pool's
                     questions, chains written by the model) before the ``cot`` prompt, greedy
===================  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from omnilm.errors import UserError
from omnilm.infer.embed import embed_texts
from omnilm.prompting import auto_cot, exemplars
from omnilm.prompting.prompts import COT_TRIGGER, Demonstration, chat_messages
from omnilm.prompting.responder import Responder

EXEMPLAR_SOURCES = ("none", "chosen", "retrieved", "auto-cot")


@dataclass(frozen=True)
class Strategy:
    name: str
    trigger: str | None = None  # appended to every question (the zero-shot chain-of-thought trigger)
    samples: int = 1  # replies per question; more than 1: self-consistency (majority vote)
    temperature: float = 0.0  # sampling temperature (0 = greedy; self-consistency needs > 0)
    shots: int = 0  # demonstrations before the question (auto-cot: clusters)
    exemplars: str = "none"  # where demonstrations come from: none | chosen | retrieved | auto-cot

    def __post_init__(self) -> None:
        if self.exemplars not in EXEMPLAR_SOURCES:
            raise UserError(f"exemplars {self.exemplars!r}: one of {', '.join(EXEMPLAR_SOURCES)}")
        if self.samples < 1 or self.shots < 0 or self.temperature < 0:
            raise UserError("prompting: samples must be >= 1, shots >= 0, temperature >= 0")
        if self.samples > 1 and self.temperature == 0:
            raise UserError(f"{self.name}: {self.samples} samples need a temperature > 0")
        if (self.exemplars == "none") != (self.shots == 0):
            raise UserError(f"{self.name}: demonstrations need both shots > 0 and an exemplar source")


STRATEGIES = {
    "greedy": Strategy("greedy"),
    "cot": Strategy("cot", trigger=COT_TRIGGER),
    "self-consistency": Strategy("self-consistency", trigger=COT_TRIGGER, samples=5, temperature=0.7),
    "few-shot": Strategy("few-shot", trigger=COT_TRIGGER, shots=4, exemplars="retrieved"),
    "auto-cot": Strategy("auto-cot", trigger=COT_TRIGGER, shots=4, exemplars="auto-cot"),
}


def make_strategy(name: str, samples: int | None = None, shots: int | None = None,
                  temperature: float | None = None, exemplars: str | None = None) -> Strategy:
    """The named strategy with any of its settings overridden."""
    if name not in STRATEGIES:
        raise UserError(f"--prompting {name!r}: one of {', '.join(STRATEGIES)}")
    changes = {k: v for k, v in dict(samples=samples, shots=shots, temperature=temperature,
                                     exemplars=exemplars).items() if v is not None}
    return replace(STRATEGIES[name], **changes)


def label(strategy: Strategy) -> str:
    """A task-name-safe label: the name, plus k for self-consistency (``self_consistency_k5``)."""
    base = strategy.name.replace("-", "_")
    return f"{base}_k{strategy.samples}" if strategy.samples > 1 else base


def prompts(strategy: Strategy, responder: Responder, questions: Sequence[str], pool: Sequence[Demonstration] = (),
            auto_cot_config: auto_cot.AutoCotConfig | None = None,
            ) -> tuple[list[list[dict[str, str]]], list[Demonstration]]:
    """The messages for every question, and the shared demonstrations (chosen or Auto-CoT; empty otherwise)."""
    if strategy.shots and not pool:
        raise UserError(f"{strategy.name}: demonstrations need a pool of training questions")
    shared: list[Demonstration] = []
    per_question: list[list[Demonstration]] = [[] for _ in questions]
    if strategy.exemplars == "chosen":
        shared = exemplars.chosen(pool, range(min(strategy.shots, len(pool))))
        per_question = [shared] * len(questions)
    elif strategy.exemplars == "retrieved":
        model, tokenizer = responder.generator.model, responder.tokenizer
        per_question = exemplars.retrieved(embed_texts(model, tokenizer, list(questions)),
                                           embed_texts(model, tokenizer, [d.question for d in pool]), pool,
                                           min(strategy.shots, len(pool)))
    elif strategy.exemplars == "auto-cot":
        config = replace(auto_cot_config or auto_cot.AutoCotConfig(), clusters=strategy.shots)
        pool_questions = [d.question for d in pool]
        vectors = embed_texts(responder.generator.model, responder.tokenizer, pool_questions)
        shared = auto_cot.demonstrations(responder, pool_questions, vectors, config,
                                         trigger=strategy.trigger or COT_TRIGGER)
        per_question = [shared] * len(questions)
    return [chat_messages(q, demos, strategy.trigger) for q, demos in zip(questions, per_question, strict=True)], shared
