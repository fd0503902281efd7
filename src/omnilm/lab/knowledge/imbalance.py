"""The ``imbalance`` study: for a fixed step budget, which distribution over people teaches the most facts?

Person i (1-based) appears in proportion to i^-α (the total number of biographies is fixed); α = 0 is uniform.
Knowledge is measured on every person equally (probes in ``probe_wording``, of a fixed random subset of all
seen people), so a large α learns the frequent people fast and gives up the rare ones. The warm-up curriculum trains
on the first ``warmup_people`` for ``warmup_epochs`` passes, then on everyone uniformly. The study found the
best α at 0.6–0.8, and the curriculum better still.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import pretrain, seen_probes, training_mixture, write_corpus
from omnilm.lab.knowledge.plots import plot_groups
from omnilm.lab.knowledge.report import pm, table
from omnilm.lab.knowledge.scaling import mean_std
from omnilm.utils.atomic import write_json_atomic, write_text_atomic

STUDY_BEST_ALPHA = (0.6, 0.8)


@dataclass
class ImbalanceConfig(KnowledgeConfig):
    """N = 400 people and a budget too short to learn them all uniformly (400 steps); one seed by default."""

    people: int = 400
    steps: int = 400
    eval_every: int = 100
    eval_examples: int = 600
    seeds: int = 1
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    warmup_people: int = 50  # the curriculum run: these people first ...
    warmup_epochs: float = 3.0  # ... for this many passes over their biographies, then everyone uniformly


def run_imbalance(config: ImbalanceConfig, out: str | Path) -> dict[str, Any]:
    """One run per α and seed, plus the curriculum; ``imbalance.png``, ``results.json``, ``report.md``."""
    out = Path(out)
    uniform = replace(config, alpha=0.0, warmup_people=0, warmup_epochs=0.0)
    base = write_corpus(uniform, out / "alpha-0.0" / "data")
    probes = seen_probes(base, config)
    runs: dict[str, list] = {}
    for alpha in config.alphas:
        run_config = replace(uniform, alpha=alpha)
        corpus = base if alpha == 0 else write_corpus(run_config, out / f"alpha-{alpha}" / "data",
                                                      tokenizer_dir=base.tokenizer_dir)
        runs[f"alpha={alpha:g}"] = [pretrain(run_config, corpus, probes, seed,
                                             out / f"alpha-{alpha}" / f"seed-{seed}")[0]
                                    for seed in range(config.seeds)]
    if config.warmup_people > 0 and config.warmup_epochs > 0:
        curriculum = replace(uniform, warmup_people=config.warmup_people, warmup_epochs=config.warmup_epochs)
        mixture = training_mixture(curriculum, base, out / "curriculum")
        runs["curriculum"] = [pretrain(curriculum, base, probes, seed, out / "curriculum" / f"seed-{seed}", mixture)[0]
                              for seed in range(config.seeds)]
    prefix = config.phase_prefix()
    results = {"config": asdict(config), "baseline": probes[config.probe_wording].baseline, "curves": runs,
               "final": {name: [{k.removeprefix(prefix): v for k, v in c[-1].items() if k.startswith(prefix)}
                                for c in curves] for name, curves in runs.items()}}
    write_json_atomic(out / "results.json", results)
    write_outputs(results, config, out)
    return results


def write_outputs(results: dict[str, Any], config: ImbalanceConfig, out: Path) -> None:
    """Plots and report from ``results`` (also used to redraw them from a saved ``results.json``)."""
    plot_imbalance(results, out / "imbalance.png")
    plot_groups(results["curves"], {"": results["baseline"]}, out / "imbalance_curves.png",
                prefix=config.phase_prefix())
    write_text_atomic(out / "report.md", imbalance_report(results, config))


def best_alpha(final: dict[str, list[dict[str, float]]]) -> tuple[str, float]:
    """The α run with the lowest mean final attribute loss (the curriculum is not an α)."""
    means = {name: mean_std([r["loss"] for r in rows])[0] for name, rows in final.items() if name != "curriculum"}
    name = min(means, key=means.__getitem__)
    return name, means[name]


def plot_imbalance(results: dict[str, Any], path: Path) -> None:
    """Final attribute loss and accuracy vs α (mean ± std), the curriculum as a horizontal band."""
    from omnilm.eval.plots import headless_pyplot, save_figure

    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    final = results["final"]
    alphas = [name for name in final if name != "curriculum"]
    xs = [float(name.split("=")[1]) for name in alphas]
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        stats = [mean_std([r[key] for r in final[name]]) for name in alphas]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label="P(i) ∝ i^-α")
        if "curriculum" in final:
            mean, std = mean_std([r[key] for r in final["curriculum"]])
            ax.axhline(mean, color="tab:green", label="warm-up curriculum")
            ax.axhspan(mean - std, mean + std, color="tab:green", alpha=0.15)
        if key == "loss":
            ax.axhline(results["baseline"], linestyle="--", color="gray", linewidth=1, label="no-knowledge baseline")
        ax.axvspan(*STUDY_BEST_ALPHA, color="tab:orange", alpha=0.12, label="study's best α")
        ax.set_xlabel("α")
        ax.set_ylabel(f"final attribute {key}")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def imbalance_report(results: dict[str, Any], config: ImbalanceConfig) -> str:
    final = results["final"]
    rows = [[name, pm([r["loss"] for r in rows]), pm([r["accuracy"] for r in rows])] for name, rows in final.items()]
    name, loss = best_alpha(final)
    alpha = float(name.split("=")[1])
    in_range = STUDY_BEST_ALPHA[0] <= alpha <= STUDY_BEST_ALPHA[1]
    verdict = ("reproduced" if in_range else "partially reproduced (imbalance helps)" if alpha > 0
               else "not reproduced (uniform sampling is best here)")
    lines = ["# Knowledge acquisition: imbalanced people and a warm-up curriculum", "", config.describe() + ".",
             "", f"Every run has the same budget; knowledge is measured uniformly over people "
             f"({config.probe_wording.replace('_', ' ')}, {config.eval_examples} probes). Baseline "
             f"{results['baseline']:.3f} nats/token.", ""]
    lines += table(["run", "final attribute loss", "final accuracy"], rows)
    lines += ["", f"Best α: {alpha:g} (final loss {loss:.3f}); the study: 0.6–0.8 — {verdict}."]
    if "curriculum" in final:
        curriculum, _ = mean_std([r["loss"] for r in final["curriculum"]])
        beats = curriculum < loss
        lines.append(f"Warm-up curriculum ({config.warmup_people} people for {config.warmup_epochs:g} epochs, then "
                     f"all): final loss {curriculum:.3f} — {'beats' if beats else 'does not beat'} the best α "
                     f"({'reproduced' if beats else 'not reproduced'}).")
    lines += ["", "![imbalance](imbalance.png)", "", "![curves](imbalance_curves.png)", ""]
    return "\n".join(lines)
