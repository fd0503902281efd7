"""The arith recipe's smoke preset end to end: problems, tokenizer, pre-training, SFT, GRPO and every strategy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnilm.cli import main


@pytest.mark.slow
def test_arith_smoke(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    out = tmp_path / "arith"
    assert main(["run", "arith", "--preset", "smoke", "--out", str(out)]) == 0
    evals = json.loads((out / "evals.json").read_text())
    for stage in ("sft", "grpo"):
        for name in ("greedy", "cot", "self_consistency_k5", "self_consistency_k10", "few_shot", "auto_cot"):
            assert 0.0 <= evals[stage][name]["acc"] <= 1.0, (stage, name)
    records = [json.loads(line) for line in (out / "arith" / "train.jsonl").read_text().splitlines()]
    assert {r["style"] for r in records} == {"direct", "worked"}
    assert all(r["messages"][0]["content"].endswith("Let's think step by step.") == (r["style"] == "worked")
               for r in records)
