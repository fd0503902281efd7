"""Multi-step integer word problems with a checkable final answer, for RL with verifiable rewards.

A problem starts with a quantity and applies 1 to ``max_steps`` operations (gain, lose, multiply, share out
evenly). Operands are chosen so every intermediate value stays a non-negative integer. The assistant's
reference answer works through the steps and ends with ``The answer is N.``, the form
:func:`extract_answer` reads back. Files: ``train.jsonl`` and ``test.jsonl`` with ``messages``, ``answer``.
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
    reply = " ".join(work) + f" The answer is {value}."
    return {"messages": [{"role": "user", "content": " ".join(question)},
                         {"role": "assistant", "content": reply}], "answer": value}


def extract_answer(response: str) -> int | None:
    """The final ``The answer is N`` of a response, or None when it states none."""
    matches = ANSWER_PATTERN.findall(response)
    return int(matches[-1]) if matches else None


def is_correct(response: str, answer: int) -> bool:
    """The verifiable reward's check: the response's final stated answer equals ``answer``."""
    return extract_answer(response) == answer


def write_arithmetic(config: ArithmeticConfig, out: str | Path) -> dict[str, Any]:
    """Generate ``train.jsonl`` and ``test.jsonl`` into ``out``."""
    if config.problems < 1 or not 1 <= config.min_steps <= config.max_steps:
        raise UserError("arithmetic: need problems >= 1 and 1 <= min_steps <= max_steps")
    rng = random.Random(config.seed)
    by_question: dict[str, dict[str, Any]] = {}  # distinct questions, so no test problem is also a train one
    for _ in range(config.problems * 20):
        problem = make_problem(rng, config)
        by_question.setdefault(problem["messages"][0]["content"], problem)
        if len(by_question) == config.problems:
            break
    else:
        raise UserError(f"arithmetic: could not make {config.problems} distinct problems; raise max_operand")
    problems = list(by_question.values())
    n_test = round(config.problems * config.test_fraction)
    out = Path(out)
    write_jsonl(out / "test.jsonl", problems[:n_test])
    write_jsonl(out / "train.jsonl", problems[n_test:])
    return {"train": len(problems) - n_test, "test": n_test}
