"""The ``plateau-scaling`` study: how the plateau length grows with the number of people N.

For every N a corpus of its own (same generator, N people) and, per seed, a fresh model trained for a budget
that grows with N; the plateau is detected per run (``phases``), and β in plateau ∝ N^β is fitted by least
squares in log space with a bootstrap over seeds (``scaling``). The study reported β = 0.81.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import phases_of, pretrain, seen_probes, write_corpus
from omnilm.lab.knowledge.report import pm, table
from omnilm.lab.knowledge.scaling import bootstrap_beta, fit_power_law
from omnilm.utils.atomic import write_json_atomic, write_text_atomic

STUDY_BETA = 0.81


@dataclass
class PlateauScalingConfig(KnowledgeConfig):
    """Four N spanning 8×, a step budget ∝ N, 2 seeds each (see README for the wall time)."""

    people_values: list[int] = field(default_factory=lambda: [100, 200, 400, 800])
    steps_per_person: float = 1.25  # training steps per person: the budget grows with N ...
    min_steps: int = 300  # ... but is never below this
    evals_per_run: int = 40  # evaluations per run, whatever its length (short plateaus need a fine grid)
    eval_examples: int = 300

    def steps_for(self, people: int) -> int:
        return max(self.min_steps, round(self.steps_per_person * people))


def run_plateau_scaling(config: PlateauScalingConfig, out: str | Path) -> dict[str, Any]:
    """Train every (N, seed), detect plateaus, fit β; ``plateau_scaling.png``, ``results.json``, ``report.md``."""
    out = Path(out)
    prefix = config.phase_prefix()
    # One cosine schedule for every N (the longest budget's), each run stopping part way along it: the
    # learning rate at a given step is then the same for every N, so plateau lengths compare like with like.
    horizon = config.steps_for(max(config.people_values))
    per_n: list[dict[str, Any]] = []
    for people in config.people_values:
        steps = config.steps_for(people)
        run_config = replace(config, people=people, steps=steps, eval_every=max(1, steps // config.evals_per_run))
        corpus = write_corpus(run_config, out / f"N-{people}" / "data")
        probes = seen_probes(corpus, run_config)
        baseline = probes[config.probe_wording].baseline
        curves = [pretrain(run_config, corpus, probes, seed, out / f"N-{people}" / f"seed-{seed}",
                           schedule_steps=horizon)[0] for seed in range(config.seeds)]
        per_n.append({"people": people, "steps": run_config.steps, "baseline": baseline, "curves": curves,
                      "phases": [phases_of(c, baseline, config, prefix) for c in curves]})
    results = {"config": asdict(config), "runs": per_n, "fits": {key: fit_phase(per_n, key) for key in FITTED}}
    write_json_atomic(out / "results.json", results)
    write_outputs(results, config, out)
    return results


def write_outputs(results: dict[str, Any], config: PlateauScalingConfig, out: Path) -> None:
    """Plot and report from ``results`` (also used to redraw them from a saved ``results.json``)."""
    plot_scaling(results["runs"], config.phase_prefix(), out / "plateau_scaling.png")
    write_text_atomic(out / "report.md", scaling_report(results, config))


# What is fitted against N: the plateau as the issue defines it, and the step where knowledge emerges (the
# plateau's end, which is what a fast initial drop would make it equal to).
FITTED = {"plateau_length": "plateau length", "emergence_step": "emergence step"}


def fit_phase(per_n: list[dict[str, Any]], key: str = "plateau_length") -> dict[str, Any]:
    """β with a bootstrap interval for phase ``key`` over the N where every seed has it (the others listed)."""
    usable = [r for r in per_n if all(p[key] for p in r["phases"])]
    excluded = [r["people"] for r in per_n if r not in usable]
    if len({r["people"] for r in usable}) < 2:
        return {"beta": None, "low": None, "high": None, "excluded_n": excluded, "c": None}
    ns = [r["people"] for r in usable]
    values = [[float(p[key]) for p in r["phases"]] for r in usable]
    beta, low, high = bootstrap_beta(ns, values)
    _, c = fit_power_law(ns, [sum(x) / len(x) for x in values])
    return {"beta": beta, "low": low, "high": high, "c": c, "excluded_n": excluded}


def plot_scaling(per_n: list[dict[str, Any]], prefix: str, path: Path) -> None:
    """Left: loss curves per N (relative to each N's baseline); right: plateau length and emergence step vs N
    in log-log, with their fits."""
    from omnilm.eval.plots import headless_pyplot, save_figure
    from omnilm.lab.knowledge.plots import mean_std_curve

    plt = headless_pyplot()
    fig, (ax_curve, ax_fit) = plt.subplots(1, 2, figsize=(11, 4))
    for run in per_n:
        steps, mean, _ = mean_std_curve(run["curves"], prefix + "loss")
        ax_curve.plot(steps, [m - run["baseline"] for m in mean], label=f"N = {run['people']}")
    ns = [r["people"] for r in per_n]
    grid = [min(ns) * (max(ns) / min(ns)) ** (i / 20) for i in range(21)]
    detected = False
    for (key, label), color in zip(FITTED.items(), ("tab:blue", "tab:red"), strict=True):
        points = [(r["people"], p[key]) for r in per_n for p in r["phases"] if p[key]]
        detected |= bool(points)
        ax_fit.scatter([n for n, _ in points], [v for _, v in points], color=color, s=14)
        fit = fit_phase(per_n, key)
        if fit["beta"] is not None:
            ax_fit.plot(grid, [fit["c"] * n ** fit["beta"] for n in grid], color=color,
                        label=f"{label}: β = {fit['beta']:.2f} [{fit['low']:.2f}, {fit['high']:.2f}]")
    ax_curve.axhline(0, linestyle="--", color="gray", linewidth=1)
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("attribute loss − baseline (nats/token)")
    ax_curve.legend(fontsize=8)
    if detected:  # log axes need at least one detected phase to show
        ax_fit.legend(fontsize=8)
        ax_fit.set_xscale("log")
        ax_fit.set_yscale("log")
    ax_fit.set_xlabel("people N")
    ax_fit.set_ylabel("steps")
    save_figure(fig, path)


def scaling_report(results: dict[str, Any], config: PlateauScalingConfig) -> str:
    prefix = config.phase_prefix()
    rows = [[r["people"], r["steps"], f"{r['baseline']:.3f}", pm([p["drop_end"] for p in r["phases"]], 0),
             pm([p["emergence_step"] for p in r["phases"]], 0), pm([p["plateau_length"] for p in r["phases"]], 0),
             pm([c[-1][prefix + "accuracy"] for c in r["curves"]])] for r in results["runs"]]
    fitted = []
    for key, label in FITTED.items():
        fit = fit_phase(results["runs"], key)
        if fit["beta"] is None:
            fitted.append(f"- {label}: β could not be fitted (fewer than two N where every seed has it).")
            continue
        excluded = f"; N left out (a seed without it): {fit['excluded_n']}" if fit["excluded_n"] else ""
        fitted.append(f"- {label} ∝ N^β: β = {fit['beta']:.2f}, 95% bootstrap interval [{fit['low']:.2f}, "
                      f"{fit['high']:.2f}]{excluded}.")
    fit = fit_phase(results["runs"], "plateau_length")
    if fit["beta"] is None:
        verdict = "not measurable: fewer than two N have a detected plateau in every seed"
    elif fit["low"] <= STUDY_BETA <= fit["high"]:
        verdict = "reproduced (the interval contains 0.81)"
    elif fit["beta"] > 0:
        verdict = "partially reproduced (the plateau grows with N, but the interval excludes 0.81)"
    else:
        verdict = "not reproduced (the plateau does not grow with N)"
    lines = ["# Knowledge acquisition: plateau length vs number of people", "",
             f"N in {config.people_values}, {config.bios_per_person} biographies per person, "
             f"{config.describe_model()}, steps = max({config.min_steps}, {config.steps_per_person}·N) of "
             f"{config.batch_size}×{config.seq_len} tokens on one cosine schedule of "
             f"{config.steps_for(max(config.people_values))} steps (no warmup, peak lr {config.lr}), {config.seeds} "
             f"seed(s) per N; phases detected "
             f"on the {config.probe_wording} probes (eps {config.eps}, delta {config.delta}).", ""]
    lines += table(["N", "steps", "baseline", "end of initial drop", "knowledge emerges", "plateau length",
                    "final accuracy"], rows)
    lines += ["", *fitted, f"- the study: plateau ∝ N^{STUDY_BETA}.", "", f"Plateau ∝ N^0.81: {verdict}.", "",
              "![plateau scaling](plateau_scaling.png)", ""]
    return "\n".join(lines)
