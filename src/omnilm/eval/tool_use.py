"""Does a model answer arithmetic better with a calculator? Held-out problems (``question``, ``answer``) asked
twice with greedy decoding: without tools (the reply's ``The answer is N.`` is read), and with the calculator,
through the tool loop (:func:`omnilm.tools.loop.run_tool_loop`: model → call → calculator → model).

Metrics: ``accuracy_without_tools``, ``accuracy_with_tools``, ``call_rate`` (problems where the model made at
least one well-formed call), ``well_formed_rate`` (of the replies that opened ``<tool_call>``, the share that was
a valid call) and ``expression_accuracy`` (problems whose first call's expression has the right value).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from omnilm.data.synth.arithmetic import extract_answer
from omnilm.tokenizer.chat import IM_END, encode_chat
from omnilm.tools.calculator import CalculatorError, evaluate
from omnilm.tools.loop import run_tool_loop, toolbox


def _first_value(arguments: str) -> Any:
    import json

    try:
        return evaluate(json.loads(arguments).get("expression"))
    except (CalculatorError, ValueError, AttributeError):
        return None


def evaluate_tool_use(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], max_new_tokens: int = 64,
                      batch_size: int = 64) -> dict[str, float]:
    """The metrics above over ``records`` (each with ``question`` and ``answer``)."""
    from omnilm.infer import SamplingParams, TextGenerator

    generator = TextGenerator(model, tokenizer)
    generator.eos_ids = sorted(set(generator.eos_ids) | {tokenizer.token_to_id(IM_END)})
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def generate(prompts: list[list[int]]) -> list[str]:
        return [text for start in range(0, len(prompts), batch_size)
                for text in generator.generate(prompts[start: start + batch_size], params)]

    tools, functions = toolbox(["calculator"])
    questions = [[{"role": "user", "content": r["question"]}] for r in records]
    plain = generate([encode_chat(tokenizer, q, add_generation_prompt=True)[0] for q in questions])
    turns = run_tool_loop(generate, tokenizer, questions, tools, functions)
    n = max(len(records), 1)
    attempts = sum(len(t.calls) + t.malformed for t in turns)
    return {
        "accuracy_without_tools": sum(extract_answer(t) == r["answer"]
                                      for t, r in zip(plain, records, strict=True)) / n,
        "accuracy_with_tools": sum(extract_answer(t.reply) == r["answer"]
                                   for t, r in zip(turns, records, strict=True)) / n,
        "call_rate": sum(bool(t.calls) for t in turns) / n,
        "well_formed_rate": sum(len(t.calls) for t in turns) / attempts if attempts else 0.0,
        "expression_accuracy": sum(bool(t.calls) and _first_value(t.calls[0][1]) == r["answer"]
                                   for t, r in zip(turns, records, strict=True)) / n,
        "examples": float(len(records)),
    }
