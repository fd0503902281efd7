"""The prompting-strategies table of the README from the ``evals.json`` of an ``arith`` run.

What is measured
    Exact-answer accuracy on the held-out arithmetic problems (200 in the full recipe) under each prompting strategy
    of :mod:`omnilm.prompting` (the recipe's ``prompting`` evaluations), after each stage that ran them.

How to run
    omnilm run arith --out runs/arith
    .venv/bin/python benchmarks/prompting_table.py runs/arith
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: (evaluation name in the recipe, column heading)
COLUMNS = [("greedy", "greedy"), ("cot", "zero-shot CoT"), ("self_consistency_k5", "self-consistency k=5"),
           ("self_consistency_k10", "self-consistency k=10"), ("few_shot", "few-shot (2 retrieved)"),
           ("auto_cot", "Auto-CoT (2)")]


def table(run: Path) -> list[str]:
    """Markdown lines: one row per stage that has the strategies' evaluations."""
    evals = json.loads((run / "evals.json").read_text(encoding="utf-8"))
    lines = ["| after | " + " | ".join(head for _, head in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for stage, results in evals.items():
        if not any(name in results for name, _ in COLUMNS):
            continue
        cells = [f"{results[name]['acc']:.3f}" if "acc" in results.get(name, {}) else "" for name, _ in COLUMNS]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the run folder (its evals.json)")
    print("\n".join(table(parser.parse_args().run)))


if __name__ == "__main__":
    main()
