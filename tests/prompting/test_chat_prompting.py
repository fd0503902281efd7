"""``omnilm chat --cot`` and ``--self-consistency K``: the trigger in the turn, the vote over K seeded samples."""

from __future__ import annotations

import subprocess
import sys

import pytest

from omnilm.infer.sampling import SamplingParams
from omnilm.infer.text import TextGenerator
from omnilm.prompting import COT_TRIGGER, AnswerReader, majority_vote
from omnilm.prompting.responder import Responder


def chat(model_dir, *flags: str) -> str:  # noqa: ANN001
    out = subprocess.run([sys.executable, "-m", "omnilm.cli", "chat", "--model", str(model_dir), "--max-new-tokens",
                          "10", *flags], input="Hello there\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("family", ["llama"])
def test_cot_and_self_consistency(model_dir) -> None:  # noqa: ANN001
    responder = Responder(TextGenerator.from_pretrained(model_dir), chat=True)
    cot = [{"role": "user", "content": f"Hello there {COT_TRIGGER}"}]
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    assert chat(model_dir, "--cot").strip() == responder.replies([cot], greedy)[0]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    replies = responder.replies([cot] * 3, params, seeds=[7, 8, 9])
    vote = majority_vote([AnswerReader()(r) for r in replies])
    got = chat(model_dir, "--cot", "--self-consistency", "3", "--temperature", "1", "--seed", "7")
    assert got == replies[vote.first or 0] + "\n"


@pytest.mark.parametrize("family", ["llama"])
def test_self_consistency_needs_sampling(model_dir) -> None:  # noqa: ANN001
    out = subprocess.run([sys.executable, "-m", "omnilm.cli", "chat", "--model", str(model_dir),
                          "--self-consistency", "3"], input="Hi\n", capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--temperature > 0" in out.stderr
