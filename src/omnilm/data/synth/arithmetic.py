"""Multi-step integer word problems with a checkable final answer, for RL with verifiable rewards.

A problem starts with a quantity and applies 1 to ``max_steps`` operations (gain, lose, multiply, share out
evenly). Operands are chosen so every intermediate value stays a non-negative integer. The assistant's
reference answer works through the steps and ends with ``The answer is N.``, the form
:func:`extract_answer` reads back. Files: ``train.jsonl`` and ``test.jsonl`` with ``messages``, ``answer``,
``question`` (the problem alone), ``solution`` (the worked answer) and ``text`` (``Question: ...\nAnswer: ...``,
the record as plain text for pre-training).

Direct and worked answers: with ``direct_fraction`` > 0, that share of the *training* problems is answered
directly (``The answer is N.``) and, with ``cot_trigger`` set, the other problems' questions end with the trigger
(e.g. "Let's think step by step.") and are answered step by step. A model trained on this learns from the data
alone that the trigger asks for the worked answer (zero-shot chain of thought). Test problems are always asked
without a trigger and keep the worked reference answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.data.synth.io import write_jsonl
from omnilm.errors import UserError

NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ivan", "Sara", "Kenji", "Ana", "Tom"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "shells", "cards", "stamps", "eggs"]
ANSWER_PATTERN = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)


@dataclass
class ArithmeticConfig:
    problems: int = 2000  # problems in train.jsonl and test.jsonl together
    test_fraction: float = 0.1  # share of problems written to test.jsonl
    min_steps: int = 1  # operations per problem, at least
    max_steps: int = 3  # operations per problem, at most
    max_operand: int = 20  # largest number a single operation uses
    direct_fraction: float = 0.0  # share of training problems answered "The answer is N." without the work
    cot_trigger: str = ""  # appended to the question of the worked training problems ("" = no trigger)
    seed: int = 0


def make_problem(rng: random.Random, config: ArithmeticConfig) -> dict[str, Any]:
    """One problem: question text, worked answer and the final integer."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, config.max_operand)
    question = [f"{name} has {value} {item}."]
    work = []
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        kind = rng.choice(["gain", "lose", "times", "share"])
        divisors = [d for d in range(2, 6) if value % d == 0]
        if kind == "lose" and value == 0:
            kind = "gain"
        if kind == "share" and not divisors:
            kind = "times"
        if kind == "gain":
            n = rng.randint(1, config.max_operand)
            question.append(f"Then {name} gets {n} more.")
            work.append(f"{value} + {n} = {value + n}.")
            value += n
        elif kind == "lose":
            n = rng.randint(1, value)
            question.append(f"Then {name} gives away {n}.")
            work.append(f"{value} - {n} = {value - n}.")
            value -= n
        elif kind == "times":
            n = rng.randint(2, 4)
            question.append(f"Then the number of {item} becomes {n} times as large.")
            work.append(f"{value} * {n} = {value * n}.")
            value *= n
        else:
            n = rng.choice(divisors)
            question.append(f"Then {name} splits them into {n} equal groups and keeps one group.")
            work.append(f"{value} / {n} = {value // n}.")
            value //= n
    question.append(f"How many {item} does {name} have now?")
    return record(" ".join(question), " ".join(work) + f" The answer is {value}.", value)


def record(question: str, solution: str, answer: int, style: str = "worked", trigger: str = "") -> dict[str, Any]:
    """A problem as a chat record: ``style`` "worked" asks ``question`` (+ " " + ``trigger``) and replies with
    ``solution``; "direct" asks ``question`` and replies ``The answer is N.``."""
    if style == "direct":
        prompt, reply = question, f"The answer is {answer}."
    else:
        prompt, reply = f"{question} {trigger}".strip(), solution
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "answer": answer, "question": question, "solution": solution, "style": style,
            "text": f"Question: {prompt}\nAnswer: {reply}"}


def extract_answer(response: str) -> int | None:
    """The final ``The answer is N`` of a response, or None when it states none."""
    matches = ANSWER_PATTERN.findall(response)
    return int(matches[-1]) if matches else None


def is_correct(response: str, answer: int) -> bool:
    """The verifiable reward's check: the response's final stated answer equals ``answer``."""
    return extract_answer(response) == answer


def distinct_problems(rng: random.Random, config: ArithmeticConfig, what: str) -> dict[str, dict[str, Any]]:
    """``config.problems`` problems with distinct questions (keyed by question), so that no test problem is also a
    training one; ``what`` names the generator in the error raised when the operand range is too small."""
    by_question: dict[str, dict[str, Any]] = {}
    for _ in range(config.problems * 20):
        problem = make_problem(rng, config)
        by_question.setdefault(problem["messages"][0]["content"], problem)
        if len(by_question) == config.problems:
            return by_question
    raise UserError(f"{what}: could not make {config.problems} distinct problems; raise max_operand")


def write_arithmetic(config: ArithmeticConfig, out: str | Path) -> dict[str, Any]:
    """Generate ``train.jsonl`` and ``test.jsonl`` into ``out``."""
    if config.problems < 1 or not 1 <= config.min_steps <= config.max_steps:
        raise UserError("arithmetic: need problems >= 1 and 1 <= min_steps <= max_steps")
    if not 0 <= config.direct_fraction <= 1:
        raise UserError("arithmetic: direct_fraction must be in [0, 1]")
    rng = random.Random(config.seed)
    problems = list(distinct_problems(rng, config, "arithmetic").values())
    n_test = round(config.problems * config.test_fraction)
    train = problems[n_test:]
    n_direct = round(len(train) * config.direct_fraction)
    styles = ["direct"] * n_direct + ["worked"] * (len(train) - n_direct)
    rng.shuffle(styles)
    train = [record(p["question"], p["solution"], p["answer"], style, config.cot_trigger)
             for p, style in zip(train, styles, strict=True)]
    out = Path(out)
    write_jsonl(out / "test.jsonl", problems[:n_test])
    write_jsonl(out / "train.jsonl", train)
    return {"train": len(train), "test": n_test, "direct": n_direct}
