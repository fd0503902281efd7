"""``omnilm chat --tools calculator`` end to end: a small model taught one tool conversation calls the
calculator, the call and its result go to stderr, and its final reply (which reads the result) to stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import small_model
from omnilm.model.hf import save_pretrained
from omnilm.tokenizer import Tokenizer
from omnilm.tokenizer.chat import encode_chat
from omnilm.tools.calculator import CALCULATOR_TOOL, run_calculator

QUESTION = "What is 123*45?"
EXPRESSION = json.dumps({"expression": "123*45"})


def taught_conversation() -> list[dict]:
    result = run_calculator(EXPRESSION)
    return [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": EXPRESSION}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": result},
            {"role": "assistant", "content": f"It is {result}."}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A small qwen2 model trained until it reproduces the taught conversation (its assistant turns) greedily."""
    ids, mask = encode_chat(tokenizer, taught_conversation(), tools=[CALCULATOR_TOOL])
    model = small_model("qwen2", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                        pad_token_id=tokenizer.pad_id, max_seq_len=512).train()
    inputs, targets = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    targets[0, torch.tensor(mask[1:]) == 0] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    return save_pretrained(model.eval(), tmp_path_factory.mktemp("tools") / "model", tokenizer=tokenizer)


def chat(model: Path, *args: str, turns: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "omnilm.cli", "chat", "--model", str(model), *args],
                          input=turns, capture_output=True, text=True, timeout=120)


def test_the_model_calls_the_calculator_and_answers_from_its_result(tool_model: Path) -> None:
    out = chat(tool_model, "--tools", "calculator", "--max-new-tokens", "160", turns=QUESTION + "\n")
    assert out.returncode == 0, out.stderr
    assert f"[calculator] {EXPRESSION} -> 5535\n" in out.stderr
    assert out.stdout == "It is 5535.\n"


def test_an_unknown_tool_is_refused_by_name(tool_model: Path) -> None:
    out = chat(tool_model, "--tools", "calculator,browser", turns=QUESTION + "\n")
    assert out.returncode == 2 and "unknown tool(s) ['browser']; available: calculator" in out.stderr
