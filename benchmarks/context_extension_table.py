"""The long-context table of the README from a context_extension run: passkey accuracy and perplexity against
context length after each stage (each extension method), wall times, and passkey heat maps.

What is measured
    ``omnilm run context_extension`` pre-trains at 256 tokens, then applies position interpolation, dynamic NTK
    and YaRN without training and PI, NTK-aware base scaling and YaRN with a short fine-tune at 2,048. After every
    stage: passkey retrieval accuracy (greedy, ``samples`` documents per length and depth) and perplexity of
    held-out biography text in windows of each length. With ``--retrieval DIR``: the ``omnilm eval`` results of
    the extended models in ``DIR/<stage>/`` (needle in a haystack and passkey over lengths × depths, lm-eval
    tasks): accuracy per length, averaged over depths, and per-stage heat maps.

How to run
    omnilm run context_extension --out runs/context_extension
    .venv/bin/python benchmarks/context_extension_table.py runs/context_extension [--plots docs/long_context]
    for stage in yarn yarn_ft ntk_ft; do
      omnilm eval --model runs/context_extension/$stage/final --tasks omnilm_needle,omnilm_passkey \
          --retrieval-lengths 256,512,1024,2048,4096 --retrieval-depths 0,0.25,0.5,0.75,1 --retrieval-samples 4 \
          --batch-size 4 --out runs/context_extension/retrieval/$stage
    done
    .venv/bin/python benchmarks/context_extension_table.py runs/context_extension \
        --retrieval runs/context_extension/retrieval [--plots docs/long_context]
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
    parser.add_argument("--retrieval", type=Path, default=None,
                        help="a folder of omnilm eval outputs, one per stage: print their table (and heat maps)")
    args = parser.parse_args()
    if args.retrieval:
        retrieval_table(args.retrieval, args.plots)
        return
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


def retrieval_table(folder: Path, plots: Path | None) -> None:
    """Accuracy per length (mean over depths) of every stage and kind evaluated by ``omnilm eval`` in ``folder``;
    with ``plots``, ``retrieval_<stage>_<kind>.png`` heat maps."""
    from omnilm.eval.harness import flat_metrics
    from omnilm.eval.long_context import cells_from_results, plot_heatmap

    rows = []
    for results_file in sorted(folder.glob("*/results.json")):
        stage = results_file.parent.name
        results = json.loads(results_file.read_text(encoding="utf-8"))
        for kind, cells in sorted(cells_from_results(flat_metrics(results)).items()):
            rows.append((stage, kind, cells))
            if plots:
                plots.mkdir(parents=True, exist_ok=True)
                title = f"{kind} (omnilm eval) after {stage}"
                plot_heatmap(cells, plots / f"retrieval_{stage}_{kind}.png", title=title)
    lengths = sorted({length for _, _, cells in rows for length, _ in cells})
    print("| stage | task | " + " | ".join(f"@{n}" for n in lengths) + " | all |")
    print("|---|---|" + "---:|" * (len(lengths) + 1))
    for stage, kind, cells in rows:
        means = []
        for n in lengths:
            values = [v for (length, _), v in cells.items() if length == n]
            means.append(f"{sum(values) / len(values):.2f}" if values else "")
        print(f"| {stage} | {kind} | " + " | ".join(means) + f" | {sum(cells.values()) / len(cells):.2f} |")


if __name__ == "__main__":
    main()
