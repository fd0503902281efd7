"""Scaling plots: IsoFLOP curves with their minima, the fitted compute-optimal frontier, loss against compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from omnilm.eval.plots import headless_pyplot, save_figure
from omnilm.scaling.laws import ChinchillaLaw


def plot_scaling(cols: dict[str, np.ndarray], law: ChinchillaLaw, report: dict[str, Any], out_png: str | Path,
                 ) -> Path:
    """Three panels: loss against N per budget (IsoFLOP curves, the fitted law as lines, approach-2 minima),
    N_opt against C (approach 2 points, approach 3 line), and every run's loss against its compute."""
    plt = headless_pyplot()
    fig, (iso, frontier, compute) = plt.subplots(1, 3, figsize=(15, 4.5))
    budgets = np.unique(cols["budget"])
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    for budget, colour in zip(budgets, colours, strict=True):
        sel = cols["budget"] == budget
        iso.scatter(cols["N"][sel], cols["loss"][sel], color=colour, label=f"C = {budget:.2g}")
        grid = np.geomspace(cols["N"][sel].min() / 1.5, cols["N"][sel].max() * 1.5, 60)
        iso.plot(grid, [law.loss(n, budget / (6 * n)) for n in grid], color=colour, alpha=0.6)
    for m in report.get("approach2", {}).get("minima", []):
        iso.scatter([m["n_opt"]], [m["loss_opt"]], marker="*", s=140, color="red", zorder=3)
    iso.set(xscale="log", xlabel="parameters N", ylabel="validation loss", title="IsoFLOP curves (line: fitted law)")
    iso.legend(fontsize=7)
    c_grid = np.geomspace(budgets.min() / 3, budgets.max() * 30, 50)
    frontier.plot(c_grid, [law.compute_optimal(c)[0] for c in c_grid], label=f"approach 3: N ∝ C^{law.a:.2f}")
    minima = report.get("approach2", {}).get("minima", [])
    if minima:
        frontier.scatter([m["flops"] for m in minima], [m["n_opt"] for m in minima], color="red",
                         label=f"approach 2 minima (a = {report['approach2']['a']:.2f})")
    frontier.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt",
                 title="compute-optimal frontier")
    frontier.legend(fontsize=8)
    compute.scatter(cols["C"], cols["loss"], s=14)
    compute.plot(c_grid, [law.loss(*law.compute_optimal(c)) for c in c_grid], color="black",
                 label="fitted law at N_opt(C)")
    compute.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="validation loss", title="loss vs compute")
    compute.legend(fontsize=8)
    return save_figure(fig, out_png)
