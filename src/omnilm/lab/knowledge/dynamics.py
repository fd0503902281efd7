"""The ``dynamics`` study: attribute loss and accuracy through pre-training, against the no-knowledge baseline.

One corpus of synthetic biographies (N people, 20 training templates per attribute), one tokenizer, then for
each seed a fresh model trained with AdamW and cosine decay without warmup (as in the study). Every
``eval_every`` steps the model completes sentences about seen people in held-out and in training wordings;
the attribute loss (value tokens only) and accuracy are logged for both. Phases are detected per seed
(``omnilm.lab.knowledge.phases``) on the ``probe_wording`` probes, and the curves are plotted as mean ± std
over seeds with the baseline as a line, overall and per attribute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import phases_of, pretrain, seen_probes, training_mixture, write_corpus
from omnilm.lab.knowledge.plots import plot_attributes, plot_groups
from omnilm.lab.knowledge.report import pm, table
from omnilm.lab.knowledge.scaling import mean_std
from omnilm.utils.atomic import write_json_atomic, write_text_atomic


@dataclass
class DynamicsConfig(KnowledgeConfig):
    """N = 800 people (a plateau of ~200 steps), 1,200 steps, 2 seeds: about 10 minutes on 2 cores."""

    people: int = 800
    steps: int = 1200
    eval_examples: int = 300


def run_dynamics(config: KnowledgeConfig, out: str | Path) -> dict[str, Any]:
    """Run the study into ``out``: ``dynamics.png``, ``dynamics_attributes.png``, ``results.json``, ``report.md``."""
    out = Path(out)
    corpus = write_corpus(config, out / "data")
    probes = seen_probes(corpus, config)
    mixture = training_mixture(config, corpus, out / "data")
    curves = [pretrain(config, corpus, probes, seed, out / f"seed-{seed}", mixture)[0] for seed in range(config.seeds)]
    detected = probes[config.probe_wording]
    results = {"config": asdict(config), "baseline": detected.baseline,
               "baselines": {name: p.baseline for name, p in probes.items()},
               "baseline_per_attribute": detected.baseline_per_attribute,
               "phases": [phases_of(c, detected.baseline, config, config.phase_prefix()) for c in curves],
               "curves": curves}
    write_json_atomic(out / "results.json", results)
    write_outputs(results, config, out)
    return results


def write_outputs(results: dict[str, Any], config: KnowledgeConfig, out: Path) -> None:
    """Plots and report from ``results`` (also used to redraw them from a saved ``results.json``)."""
    curves, baselines = results["curves"], results["baselines"]
    prefixes = {name: "" if i == 0 else name + "/" for i, name in enumerate(baselines)}
    marks = [mean_std([p[key] for p in results["phases"]])[0] for key in ("drop_end", "emergence_step")
             if all(p[key] is not None for p in results["phases"])]
    plot_groups({name.replace("_", " "): [[{k.removeprefix(prefix): v for k, v in r.items()} for r in c]
                                          for c in curves] for name, prefix in prefixes.items()},
                {name.replace("_", " "): value for name, value in baselines.items()}, out / "dynamics.png",
                marks=marks)
    plot_attributes(curves, results["baseline_per_attribute"], out / "dynamics_attributes.png",
                    config.phase_prefix())
    write_text_atomic(out / "report.md", dynamics_report(results, config))


def plateau_accuracy(curve: list[dict[str, float]], phases: dict[str, Any], prefix: str = "") -> float | None:
    """Highest accuracy at the evaluations on the plateau (from the drop's end to before emergence)."""
    if phases["drop_end"] is None:
        return None
    end = phases["emergence_step"] if phases["emergence_step"] is not None else float("inf")
    on = [r[prefix + "accuracy"] for r in curve if phases["drop_end"] <= r["step"] < end]
    return max(on) if on else None


def dynamics_report(results: dict[str, Any], config: KnowledgeConfig) -> str:
    phases, curves, prefix = results["phases"], results["curves"], config.phase_prefix()
    rows = [[seed, p["drop_end"], p["emergence_step"], p["plateau_length"], _fmt(plateau_accuracy(c, p, prefix)),
             f"{c[-1][prefix + 'loss']:.3f}", f"{c[-1][prefix + 'accuracy']:.3f}", f"{c[-1]['accuracy']:.3f}"]
            for seed, (p, c) in enumerate(zip(phases, curves, strict=True))]
    attributes = sorted(results["baseline_per_attribute"])
    per_attribute = [[a, f"{results['baseline_per_attribute'][a]:.3f}",
                      pm([c[-1][f"{prefix}{a}/loss"] for c in curves]),
                      pm([c[-1][f"{prefix}{a}/accuracy"] for c in curves]),
                      pm([c[-1][f"{a}/accuracy"] for c in curves])]
                     for a in attributes if f"{prefix}{a}/loss" in curves[0][-1]]
    three = all(p["plateau_length"] is not None for p in phases)
    verdict = ("reproduced: a drop to the baseline, a plateau near it, then knowledge emerging in every seed"
               if three else "not reproduced in every seed at this scale (see the table)")
    wording = config.probe_wording.replace("_", " ")
    lines = ["# Knowledge acquisition: training dynamics", "", config.describe() + ".", "",
             f"No-knowledge baseline (attribute loss of the marginal distribution): {results['baseline']:.3f} "
             f"nats/token. Phases are detected on the {wording} probes (eps {config.eps}, delta {config.delta}, "
             f"patience {config.patience}); the last column is accuracy on held-out templates.", ""]
    lines += table(["seed", "end of initial drop", "knowledge emerges", "plateau length", "max accuracy on plateau",
                    f"final loss ({wording})", f"final accuracy ({wording})", "final accuracy (held out)"], rows)
    lines += ["", f"Plateau length {pm([p['plateau_length'] for p in phases], 0)} steps.", "",
              f"Per attribute at the end ({wording} probes, and held-out accuracy):", ""]
    lines += table(["attribute", "baseline", "loss", "accuracy", "held-out accuracy"], per_attribute)
    lines += ["", f"Three-phase curve: {verdict}.", "", "![dynamics](dynamics.png)", "",
              "![per attribute](dynamics_attributes.png)", ""]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
