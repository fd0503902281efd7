"""Plots shared by the studies: curves as mean ± std over seeds, with the no-knowledge baseline drawn in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from omnilm.lab.knowledge.scaling import mean_std

Curve = Sequence[Mapping[str, float]]
METRICS = (("loss", "attribute loss (nats/token)"), ("accuracy", "attribute accuracy"))


def mean_std_curve(curves: Sequence[Curve], key: str) -> tuple[list[float], list[float], list[float]]:
    """Steps, mean and std of ``key`` over seeds (curves share their evaluation steps)."""
    steps = [r["step"] for r in curves[0]]
    stats = [mean_std([c[i][key] for c in curves]) for i in range(len(steps))]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def _band(ax: object, curves: Sequence[Curve], key: str, label: str) -> None:
    steps, mean, std = mean_std_curve(curves, key)
    (line,) = ax.plot(steps, mean, label=label)  # type: ignore[attr-defined]
    ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],  # type: ignore[attr-defined]
                    [m + s for m, s in zip(mean, std, strict=True)], alpha=0.25, color=line.get_color())


def plot_groups(groups: Mapping[str, Sequence[Curve]], baselines: Mapping[str, float], path: Path,
                prefix: str = "", title: str = "", xlabel: str = "step", marks: Sequence[float] = ()) -> None:
    """Loss (with one dashed baseline line per entry of ``baselines``) and accuracy vs step for each group;
    ``marks`` are steps drawn as dotted vertical lines (e.g. the detected phase boundaries)."""
    from omnilm.eval.plots import headless_pyplot, save_figure

    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label) in zip(axes, METRICS, strict=True):
        for name, curves in groups.items():
            _band(ax, curves, prefix + key, f"{name} ({len(curves)} seed{'s' if len(curves) != 1 else ''})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
    names_at: dict[float, list[str]] = {}  # probe sets with the same baseline share one line and label
    for name, value in baselines.items():
        names_at.setdefault(round(value, 6), []).append(name)
    for value, names in names_at.items():
        axes[0].axhline(value, linestyle="--", color="gray", linewidth=1)
        axes[0].annotate(f"baseline {', '.join(n for n in names if n)}".strip(), (0, value),
                         textcoords="offset points", xytext=(4, 3), xycoords=("axes fraction", "data"), fontsize=8,
                         color="gray")
    for step in marks or ():
        for ax in axes:
            ax.axvline(step, linestyle=":", color="black", linewidth=1)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_attributes(curves: Sequence[Curve], baselines: Mapping[str, float], path: Path, prefix: str = "") -> None:
    """One panel per attribute: its loss (with its own baseline) and, on a second axis, its accuracy."""
    from omnilm.eval.plots import headless_pyplot, save_figure

    plt = headless_pyplot()
    names = sorted(baselines)
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(4 * ((len(names) + 1) // 2), 7), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        _band(ax, curves, f"{prefix}{name}/loss", "loss")
        ax.axhline(baselines[name], linestyle="--", color="gray", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        twin = ax.twinx()
        steps, mean, _ = mean_std_curve(curves, f"{prefix}{name}/accuracy")
        twin.plot(steps, mean, color="tab:green", label="accuracy")
        twin.set_ylim(0, 1)
        twin.set_ylabel("accuracy", color="tab:green")
    axes.flat[0].set_ylabel("attribute loss (nats/token); dashed: baseline")
    fig.tight_layout()
    save_figure(fig, path)
