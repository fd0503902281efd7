"""The retrieval-augmented QA table of the README from the ``evals.json`` of demo runs.

What is measured
    Each run folder is the demo recipe run with a set of presets (none, ``qa_pretrain``, ``rag_sft``, both).
    Per run, after its last stage: QA accuracy on the held-out half of the people (their QA was never trained)
    closed-book (``qa_heldout``) and open-book (``qa_heldout_rag``: top-2 retrieved biographies in the
    question), the rate of "I don't know." on people who do not exist closed- and open-book (``qa_unknown``,
    ``qa_unknown_rag``), the SFT half (``qa_trained``), completion of held-out templates after pre-training,
    retrieval recall@k, and open-book accuracy on the test half of the readers (``qa_reading_rag``, ``rag_sft``
    only: people in no training text, so reading alone).

How to run
    omnilm run --out runs/rag/plain
    omnilm run --preset qa_pretrain --out runs/rag/qa_pretrain
    omnilm run --preset rag_sft --out runs/rag/rag_sft
    omnilm run --preset qa_pretrain,rag_sft --out runs/rag/both
    .venv/bin/python benchmarks/rag_table.py runs/rag/plain runs/rag/qa_pretrain runs/rag/rag_sft runs/rag/both
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(run: Path, stage: str | None) -> list[str]:
    evals = json.loads((run / "evals.json").read_text(encoding="utf-8"))
    last = evals[stage or list(evals)[-1]]

    def cell(name: str, metric: str = "accuracy", source: dict | None = None) -> str:
        value = (source or last).get(name, {}).get(metric)
        return "" if value is None else f"{value:.3f}"

    return [run.name, cell("qa_heldout"), cell("qa_heldout_rag"), cell("qa_unknown"), cell("qa_unknown_rag"),
            cell("qa_trained"), cell("completion", source=evals.get("pretrain")), cell("qa_heldout_rag", "recall_at_k"),
            cell("qa_reading_rag")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--stage", default=None, help="the stage whose evaluations are shown (default: the last)")
    args = parser.parse_args()
    head = ["run", "held-out closed", "held-out open (RAG)", "unknown: IDK closed", "unknown: IDK open",
            "SFT half", "completion (pretrain)", "recall@2", "readers open (reading alone)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run in args.runs:
        print("| " + " | ".join(row(run, args.stage)) + " |")


if __name__ == "__main__":
    main()
