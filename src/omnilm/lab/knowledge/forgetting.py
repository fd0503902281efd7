"""The ``forgetting`` study: what happens to known facts when a model is fine-tuned on new people?

A model is pre-trained on the biographies of people A, then fine-tuned on the biographies of new people B,
once on B alone and once with a fraction ``replay_fraction`` of every batch replayed from A. The probes of
A and of B are evaluated at the start of fine-tuning and every ``finetune_eval_every`` steps. The study saw
A's loss rise sharply in the first few hundred steps of fine-tuning, with replay helping only later.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import (
    PROBE_FILES,
    Probes,
    biographies_of,
    evaluator,
    loader,
    new_model,
    train,
    write_corpus,
)
from omnilm.lab.knowledge.plots import plot_groups
from omnilm.lab.knowledge.report import pm, table
from omnilm.utils.atomic import write_json_atomic, write_text_atomic


@dataclass
class ForgettingConfig(KnowledgeConfig):
    """200 people A for 800 steps, then 200 new people B for 300 steps, with and without replay; 2 seeds."""

    steps: int = 800  # pre-training on A
    new_people: int = 200  # people B, seen only in fine-tuning
    finetune_steps: int = 300
    finetune_lr: float = 2e-3  # peak of a fresh cosine schedule (no warmup) for fine-tuning
    finetune_eval_every: int = 20
    replay_fraction: float = 0.25  # share of each fine-tuning batch drawn from A's biographies in the replay run
    eval_examples: int = 300


def run_forgetting(config: ForgettingConfig, out: str | Path) -> dict[str, Any]:
    """Pre-train on A, fine-tune on B without and with replay; ``forgetting.png``, ``results.json``, ``report.md``."""
    if not 0 < config.replay_fraction < 1:
        raise ValueError(f"replay_fraction must lie in (0, 1), got {config.replay_fraction}")
    out = Path(out)
    everyone = replace(config, people=config.people + config.new_people)
    corpus = write_corpus(everyone, out / "data")
    tokenizer = corpus.tokenizer
    old = lambda person: person < config.people  # noqa: E731
    new = lambda person: person >= config.people  # noqa: E731
    shards = {"old": biographies_of(corpus, old, out / "data" / "old_tokens"),
              "new": biographies_of(corpus, new, out / "data" / "new_tokens")}
    probes = {group: Probes.of_corpus(corpus, config.eval_examples, keep, PROBE_FILES[config.probe_wording])
              for group, keep in (("old", old), ("new", new))}
    evaluate = evaluator(tokenizer, probes)
    runs: dict[str, list] = {"B only": [], f"B + {config.replay_fraction:g} replay of A": []}
    pretraining = []
    for seed in range(config.seeds):
        model = new_model(config, tokenizer, seed)
        pretraining.append(train(config, model, loader({"old": shards["old"]}, config, seed), evaluate, seed,
                                 out / f"seed-{seed}" / "pretrain-A"))
        for name, weights in zip(runs, ({"new": 1.0}, {"new": 1 - config.replay_fraction,
                                                      "old": config.replay_fraction}), strict=True):
            tuned = copy.deepcopy(model)
            start = {"step": 0} | evaluate(tuned)
            rows = train(config, tuned, loader(shards, config, seed, weights), evaluate, seed,
                         out / f"seed-{seed}" / ("finetune-replay" if "replay" in name else "finetune"),
                         steps=config.finetune_steps, lr=config.finetune_lr, eval_every=config.finetune_eval_every)
            runs[name].append([start] + rows)
    results = {"config": asdict(config), "baseline": {g: p.baseline for g, p in probes.items()},
               "pretraining": pretraining, "finetuning": runs}
    write_json_atomic(out / "results.json", results)
    write_outputs(results, config, out)
    return results


def write_outputs(results: dict[str, Any], config: ForgettingConfig, out: Path) -> None:
    """Plots and report from ``results`` (also used to redraw them from a saved ``results.json``)."""
    runs, baseline = results["finetuning"], results["baseline"]
    plot_groups(runs, {"A": baseline["old"]}, out / "forgetting_A.png", title="people A (pre-training) "
                "during fine-tuning on B", xlabel="fine-tuning step")
    plot_groups(runs, {"B": baseline["new"]}, out / "forgetting_B.png", prefix="new/",
                title="people B (new) during fine-tuning", xlabel="fine-tuning step")
    write_text_atomic(out / "report.md", forgetting_report(results, config))


def forgetting_report(results: dict[str, Any], config: ForgettingConfig) -> str:
    runs = results["finetuning"]
    early = min(100, config.finetune_steps)

    def at(curve: list[dict[str, float]], step: int) -> dict[str, float]:
        return min(curve, key=lambda r: abs(r["step"] - step))

    rows = []
    for name, curves in runs.items():
        rows.append([name, pm([c[0]["loss"] for c in curves]), pm([at(c, early)["loss"] for c in curves]),
                     pm([c[-1]["loss"] for c in curves]), pm([c[0]["accuracy"] for c in curves]),
                     pm([at(c, early)["accuracy"] for c in curves]), pm([c[-1]["accuracy"] for c in curves]),
                     pm([c[-1]["new/accuracy"] for c in curves])])
    plain = next(iter(runs.values()))
    rise = [at(c, early)["loss"] - c[0]["loss"] for c in plain]
    replayed = list(runs.values())[1]
    helps = pm([a[-1]["loss"] - b[-1]["loss"] for a, b in zip(plain, replayed, strict=True)])
    sharp = min(rise) > 0.5
    wording = config.probe_wording.replace("_", " ")
    lines = ["# Knowledge acquisition: forgetting when fine-tuning on new people", "",
             f"Pre-training: {config.describe()} on people A; fine-tuning: {config.new_people} new people B for "
             f"{config.finetune_steps} steps at lr {config.finetune_lr} (fresh cosine), without replay and with "
             f"{config.replay_fraction:g} of each batch from A. Probes: {wording}; baselines A "
             f"{results['baseline']['old']:.3f}, B {results['baseline']['new']:.3f} nats/token.", ""]
    lines += table(["fine-tuning", "A loss at start", f"A loss at step {early}", "A loss at end", "A accuracy at start",
                    f"A accuracy at step {early}", "A accuracy at end", "B accuracy at end"], rows)
    lowest = [min(c, key=lambda r: r["accuracy"]) for c in replayed]
    lines += ["", f"Rise of A's loss in the first {early} steps without replay: {pm(rise)} nats/token — "
              f"{'reproduced (a sharp rise)' if sharp else 'not reproduced (no sharp rise)'}.",
              f"With replay, A's accuracy first falls to {pm([r['accuracy'] for r in lowest])} (at step "
              f"{pm([r['step'] for r in lowest], 0)}), then ends at {pm([c[-1]['accuracy'] for c in replayed])}; "
              f"replay lowers A's final loss by {helps} nats/token (B-only minus replay).", "",
              "![A during fine-tuning](forgetting_A.png)", "", "![B during fine-tuning](forgetting_B.png)", ""]
    return "\n".join(lines)
