"""Calculator-tool conversations: arithmetic word problems (:mod:`omnilm.data.synth.arithmetic`, with larger
numbers than a small model computes reliably) answered by calling the calculator.

Each record is one exchange in the chat template's tool format (:mod:`omnilm.tokenizer.chat`)::

    user:      the question
    assistant: <tool_call> calculator {"expression": "(437 + 28) * 3 - 152"} </tool_call>
    tool:      1243
    assistant: The answer is 1243.

with ``tools: [CALCULATOR_TOOL]`` (the SFT loader renders them into the system turn), ``answer``,
``expression``, ``question`` and ``text`` (the rendered conversation, for training a tokenizer). The expression
follows the question's operations in order (parenthesised where precedence needs it) and the tool's result is
what :func:`omnilm.tools.calculator.run_calculator` answers, so the data and the tool at evaluation time agree.
``plain_fraction`` of the training records keep the worked reply without tools (so that a model asked without
tools still answers step by step). Files: ``train.jsonl`` and ``test.jsonl`` (test records are always tool
conversations; evaluations ask their question with and without tools).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.data.synth.arithmetic import ArithmeticConfig, distinct_problems
from omnilm.data.synth.io import write_jsonl
from omnilm.errors import UserError
from omnilm.tokenizer.chat import format_chat
from omnilm.tools.calculator import CALCULATOR_TOOL, NAME, run_calculator

#: One worked step of an arithmetic solution: ``value op operand = result.``
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")


@dataclass
class CalculatorConfig:
    problems: int = 2000  # problems in train.jsonl and test.jsonl together
    test_fraction: float = 0.1  # share of problems written to test.jsonl
    min_steps: int = 1  # operations per problem, at least
    max_steps: int = 3  # operations per problem, at most
    max_operand: int = 999  # largest number a single operation uses (the arithmetic recipe trains up to 20)
    plain_fraction: float = 0.0  # share of training problems answered step by step without tools
    seed: int = 0


def expression_of(solution: str) -> str:
    """The single expression that computes a worked arithmetic solution's steps in order."""
    steps = STEP.findall(solution)
    if not steps:
        raise UserError(f"no arithmetic steps in {solution!r}")
    expression = steps[0][0]
    for _, op, operand, _ in steps:
        if op in "*/" and (" + " in expression or " - " in expression):
            expression = f"({expression})"
        expression = f"{expression} {op} {operand}"
    return expression


def tool_record(question: str, expression: str) -> dict[str, Any]:
    """The calculator conversation for ``question`` (the tool's result computed by the calculator itself)."""
    result = run_calculator({"expression": expression})
    call = {"type": "function", "function": {"name": NAME, "arguments": {"expression": expression}}}
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "content": result},
                         {"role": "assistant", "content": f"The answer is {result}."}],
            "tools": [CALCULATOR_TOOL], "question": question, "expression": expression, "answer": int(result)}


def with_text(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``text``: its conversation as the chat template renders it (for the tokenizer)."""
    return record | {"text": format_chat(record["messages"], tools=record.get("tools"))}


def write_calculator(config: CalculatorConfig, out: str | Path) -> dict[str, Any]:
    """Generate ``train.jsonl`` and ``test.jsonl`` into ``out``."""
    if not 0 <= config.plain_fraction <= 1:
        raise UserError("calculator: plain_fraction must be in [0, 1]")
    arithmetic = ArithmeticConfig(problems=config.problems, min_steps=config.min_steps, max_steps=config.max_steps,
                                  max_operand=config.max_operand, seed=config.seed)
    if config.problems < 1 or not 1 <= config.min_steps <= config.max_steps:
        raise UserError("calculator: need problems >= 1 and 1 <= min_steps <= max_steps")
    rng = random.Random(config.seed)
    by_question = distinct_problems(rng, arithmetic, "calculator")
    records = []
    for question, problem in by_question.items():
        record = tool_record(question, expression_of(problem["messages"][-1]["content"]))
        if record["answer"] != problem["answer"]:
            raise AssertionError(f"the expression {record['expression']} does not give {problem['answer']}")
        records.append((record, problem))
    n_test = round(config.problems * config.test_fraction)
    train = []
    for record, problem in records[n_test:]:
        plain = rng.random() < config.plain_fraction
        train.append({"messages": problem["messages"], "question": record["question"], "answer": record["answer"]}
                     if plain else record)
    out = Path(out)
    write_jsonl(out / "test.jsonl", [with_text(record) for record, _ in records[:n_test]])
    write_jsonl(out / "train.jsonl", [with_text(record) for record in train])
    return {"train": len(train), "test": n_test, "plain": sum("tools" not in r for r in train)}
