"""The long-context table of the README from a context_extension run: passkey accuracy and perplexity against
context length after each stage (each extension method), wall times, and passkey heat maps.

What is measured
    ``omnilm run context_extension`` pre-trains at 256 tokens, then applies position interpolation, dynamic NTK
    and YaRN without training and PI, NTK-aware base scaling and YaRN with a short fine-tune at 2,048. After every
    stage: passkey retrieval accuracy (greedy, ``samples`` documents per length and depth) and perplexity of
    held-out biography text in windows of each length.

How to run
    omnilm run context_extension --out runs/context_extension
    .venv/bin/python benchmarks/context_extension_table.py runs/context_extension [--plots docs/long_context]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def lengths_of(metrics: dict[str, float], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in metrics if (m := re.match(rf"^{prefix}@(\d+)$", k))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a context_extension run folder")
    parser.add_argument("--plots", type=Path, default=None, help="write <stage>_passkey.png heat maps here")
    args = parser.parse_args()
    evals = json.loads((args.run / "evals.json").read_text(encoding="utf-8"))
    summary = json.loads((args.run / "summary.json").read_text(encoding="utf-8"))
    first = next(iter(evals.values()))
    acc_lengths, ppl_lengths = lengths_of(first["passkey"], "acc"), lengths_of(first["ppl"], "ppl")
    header = ([f"passkey@{n}" for n in acc_lengths] + [f"ppl@{n}" for n in ppl_lengths]
              + ["train steps", "train s"])
    print("| stage | " + " | ".join(header) + " |")
    print("|---|" + "---:|" * len(header))
    for stage, results in evals.items():
        info = summary["stages"].get(stage, {})
        cells = [f"{results['passkey'][f'acc@{n}']:.2f}" for n in acc_lengths]
        cells += [f"{results['ppl'][f'ppl@{n}']:.2f}" for n in ppl_lengths]
        cells += [str(info.get("steps", "")), f"{info.get('seconds', 0):.0f}"]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print(f"\nrecipe wall time: {summary.get('seconds', 0):.0f} s")
    if args.plots:
        from omnilm.eval.long_context import cells_from_results, plot_heatmap

        args.plots.mkdir(parents=True, exist_ok=True)
        for stage, results in evals.items():
            cells = cells_from_results(results["passkey"])["passkey"]
            plot_heatmap(cells, args.plots / f"{stage}_passkey.png", title=f"passkey retrieval after {stage}")


if __name__ == "__main__":
    main()
