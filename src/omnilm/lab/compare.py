"""Comparing training runs of the objective and capacity labs (``moe``, ``mtp``, ``selective``) at equal compute.

A run is a mapping with ``curve`` (evaluation rows: step, flops, attribute ``loss`` and ``accuracy`` on held-out
wordings, ``train_templates/...`` on training wordings), ``params`` and ``active_params``. The figure puts the
three metrics against training FLOPs; the report is one table row per run at its last evaluation, plus the
accuracy each run had reached when it had used the smallest total budget of all runs (linear interpolation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omnilm.lab.knowledge.report import table

METRICS = (("loss", "attribute loss (held-out wordings)"), ("accuracy", "accuracy (held-out wordings)"),
           ("train_templates/accuracy", "accuracy (training wordings)"))


def with_flops(rows: Sequence[dict[str, float]], flops_per_step: float, offset_steps: int = 0,
               offset_flops: float = 0.0) -> list[dict[str, float]]:
    """Evaluation rows with their step shifted by ``offset_steps`` and ``flops`` = offset + per-step FLOPs · steps."""
    return [r | {"step": r["step"] + offset_steps, "flops": offset_flops + flops_per_step * r["step"]} for r in rows]


def at_flops(curve: Sequence[dict[str, float]], key: str, flops: float) -> float:
    """``key`` linearly interpolated at ``flops`` along ``curve`` (clamped to its ends)."""
    points = [(r["flops"], r[key]) for r in curve]
    if flops <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= flops <= x1:
            return y0 + (y1 - y0) * (flops - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def plot_runs(runs: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for name, run in runs.items():
        flops = [r["flops"] for r in run["curve"]]
        for ax, (key, _) in zip(axes, METRICS, strict=True):
            ax.plot(flops, [r[key] for r in run["curve"]], marker="o", ms=3, label=name)
    for ax, (_, title) in zip(axes, METRICS, strict=True):
        ax.set_xlabel("training FLOPs")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runs_table(runs: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Sequence[str]] | None = None,
               extra_headers: Sequence[str] = ()) -> list[str]:
    """The report table: per run its size, FLOPs, final metrics and held-out accuracy at the common budget."""
    budget = min(run["curve"][-1]["flops"] for run in runs.values())
    rows = []
    for name, run in runs.items():
        last = run["curve"][-1]
        rows.append([name, f"{run['params'] / 1e6:.2f}M", f"{run['active_params'] / 1e6:.2f}M", f"{last['flops']:.2e}",
                     f"{last['loss']:.3f}", f"{last['accuracy']:.3f}", f"{last['train_templates/accuracy']:.3f}",
                     f"{at_flops(run['curve'], 'accuracy', budget):.3f}", *(extra or {}).get(name, ())])
    headers = ["run", "params", "active (non-emb.)", "FLOPs", "attr. loss (held-out)", "acc. (held-out)",
               "acc. (train wordings)", f"acc. (held-out) at {budget:.2e} FLOPs", *extra_headers]
    return table(headers, rows)
