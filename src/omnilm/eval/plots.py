"""Training curves as PNG files (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_training_curves(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Train loss (and validation loss where logged) against the step, plus the learning rate."""
    plt = headless_pyplot()
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax_loss.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title(title or Path(metrics_path).parent.name)
    if lrs:
        ax_lr.plot(*zip(*lrs, strict=True), color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    return save_figure(fig, out_png)


#: Per-step RL metrics plotted by :func:`plot_rl_curves`, with their axis labels.
RL_CURVES = (("reward", "mean reward"), ("kl", "KL to reference\n(nats/token)"),
             ("entropy", "entropy\n(nats/token)"), ("response_length", "response length\n(tokens)"))


def plot_rl_curves(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Reward, KL to the reference, policy entropy and response length of an RL stage against the step."""
    plt = headless_pyplot()
    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(len(RL_CURVES), 1, figsize=(7, 8), sharex=True)
    for ax, (key, label) in zip(axes, RL_CURVES, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(title or Path(metrics_path).parent.name)
    axes[-1].set_xlabel("step")
    return save_figure(fig, out_png)


def headless_pyplot() -> Any:
    """matplotlib.pyplot with the non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")  # headless: runs write files, they never open windows
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_png: str | Path) -> Path:
    """Write ``fig`` to ``out_png`` atomically (a reader never sees a half-written image) and close it."""
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    headless_pyplot().close(fig)
    tmp.replace(out_png)
    return out_png
