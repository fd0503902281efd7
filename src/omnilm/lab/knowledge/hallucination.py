"""The ``hallucination`` study: how confident is the model about people it has never read about?

The corpus also draws ``unseen_people`` who appear in no biography. After pre-training, the model completes
held-out-template sentences about seen and unseen people. Two views of confidence per probe:

* teacher-forced, at the first token of the true value: the maximum probability and the entropy of the
  next-token distribution (how peaked the model is where the fact should start);
* generated: the greedy completion up to the sentence's period, its confidence exp(mean log p) over its
  value tokens, whether it is right, and whether it is the value of some seen person (a fluent, plausible fact).

A "confident wrong" answer is a wrong greedy completion with confidence ≥ ``confident``. About unseen people
every answer is wrong (their facts are unknowable), so the question is how often the model is still confident.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.eval.attributes import AttributeExample, read_jsonl, target_log_probs
from omnilm.lab.knowledge.config import KnowledgeConfig
from omnilm.lab.knowledge.experiment import Probes, pretrain, write_corpus
from omnilm.lab.knowledge.report import pm, table
from omnilm.utils.atomic import write_json_atomic, write_text_atomic

GROUPS = ("seen", "unseen")


@dataclass
class HallucinationConfig(KnowledgeConfig):
    """N = 200 seen and 200 unseen people, 800 steps (accuracy on seen people well above zero), 2 seeds."""

    steps: int = 800
    unseen_people: int = 200  # people with attributes but no biography
    eval_examples: int = 600
    confident: float = 0.5  # a completion is confident when exp(mean log p of its tokens) reaches this
    max_value_tokens: int = 16  # greedy completions stop at the period or after this many tokens


def greedy_completions(model: nn.Module, tokenizer: Any, examples: list[AttributeExample],
                       max_tokens: int) -> list[tuple[str, float]]:
    """Per probe: the greedy completion up to the first "." and its confidence, exp(mean log p) over the
    completion's value tokens (the terminator excluded)."""
    from omnilm.infer.generate import generate_ids
    from omnilm.infer.sampling import SamplingParams

    period = tokenizer.encode(".")
    eos = list({*period, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    steps = list(generate_ids(model, [list(e.prompt_ids) for e in examples], params, eos_ids=eos,
                              pad_id=tokenizer.pad_id or 0))
    texts, generated = [], []
    for row, example in enumerate(examples):
        tokens = []
        for step in steps:
            token = int(step[row])
            if token < 0:
                break
            tokens.append(token)
            if token in eos:
                break
        texts.append(tokenizer.decode(tokens).split(".")[0].strip())
        # Confidence in the value: the terminator (nearly certain once a value is complete) does not count,
        # unless it is all there is.
        value_len = max(1, len(tokens) - (1 if tokens and tokens[-1] in eos else 0))
        generated.append(AttributeExample(example.person_id, example.attribute, example.prompt_ids,
                                          tuple(tokens) or (eos[0],), value_len))
    confidences = [math.exp(float(log_probs.gather(-1, targets[:, None])[:example.value_len].mean()))
                   for example, log_probs, targets in target_log_probs(model, generated, tokenizer.pad_id or 0)]
    return list(zip(texts, confidences, strict=True))


@torch.no_grad()
def first_token_confidence(model: nn.Module, examples: list[AttributeExample],
                           pad_id: int) -> list[tuple[float, float]]:
    """Per probe, at the true value's first token: (max probability, entropy in nats) of the model's prediction."""
    out = []
    for _, log_probs, _ in target_log_probs(model, examples, pad_id):
        first = log_probs[0]
        out.append((float(first.exp().max()), float(-(first.exp() * first).sum())))
    return out


def confidence_table(model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], examples: list[AttributeExample],
                     plausible: dict[str, set[str]], config: HallucinationConfig) -> list[dict[str, Any]]:
    """One row per probe with every confidence measure (module docstring)."""
    model.eval()
    firsts = first_token_confidence(model, examples, tokenizer.pad_id or 0)
    completions = greedy_completions(model, tokenizer, examples, config.max_value_tokens)
    rows = []
    for record, (max_prob, entropy), (text, confidence) in zip(records, firsts, completions, strict=True):
        correct = text.casefold() == record["value"].casefold()
        rows.append({"attribute": record["attribute"], "value": record["value"], "completion": text,
                     "correct": correct, "confidence": confidence, "first_max_prob": max_prob,
                     "first_entropy": entropy, "plausible": text in plausible[record["attribute"]],
                     "confident_wrong": (not correct) and confidence >= config.confident})
    return rows


def run_hallucination(config: HallucinationConfig, out: str | Path) -> dict[str, Any]:
    """Train per seed, then measure confidence on seen vs unseen people; plot, table, results."""
    import random

    from omnilm.eval.attributes import build_examples

    out = Path(out)
    corpus = write_corpus(config, out / "data", unseen_people=config.unseen_people)
    tokenizer = corpus.tokenizer
    marginals = corpus.marginals()
    plausible = {a: set(values) for a, values in marginals.items()}
    probes = {"held_out": Probes.of_corpus(corpus, config.eval_examples)}
    records = {"seen": read_jsonl(corpus.bios / "eval.jsonl"), "unseen": read_jsonl(corpus.bios / "eval_unseen.jsonl")}
    records = {g: random.Random(1).sample(r, min(len(r), config.eval_examples)) for g, r in records.items()}
    examples = {g: build_examples(r, tokenizer) for g, r in records.items()}
    per_seed = []
    for seed in range(config.seeds):
        _, model = pretrain(config, corpus, probes, seed, out / f"seed-{seed}")
        per_seed.append({g: confidence_table(model, tokenizer, records[g], examples[g], plausible, config)
                         for g in GROUPS})
    summary = [summarise(tables) for tables in per_seed]
    results = {"config": asdict(config), "baseline": probes["held_out"].baseline, "summary": summary,
               "probes": per_seed}
    write_json_atomic(out / "results.json", results)
    write_outputs(results, config, out)
    return results


def write_outputs(results: dict[str, Any], config: HallucinationConfig, out: Path) -> None:
    """Plot and report from ``results`` (also used to redraw them from a saved ``results.json``)."""
    plot_confidence(results["probes"], config, out / "hallucination.png")
    write_text_atomic(out / "report.md", hallucination_report(results, config))


def summarise(tables: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per group (seen; seen answered right; seen answered wrong; unseen): the mean of every measure."""
    groups = {"seen": tables["seen"], "seen, right": [r for r in tables["seen"] if r["correct"]],
              "seen, wrong": [r for r in tables["seen"] if not r["correct"]], "unseen": tables["unseen"]}
    keys = ("correct", "confidence", "first_max_prob", "first_entropy", "plausible", "confident_wrong")
    return {name: {"probes": float(len(rows))} | {k: (sum(float(r[k]) for r in rows) / len(rows) if rows else math.nan)
                                                 for k in keys} for name, rows in groups.items()}


def plot_confidence(per_seed: list[dict[str, list[dict[str, Any]]]], config: HallucinationConfig, path: Path) -> None:
    """Histograms of completion confidence and first-token entropy: seen-right, seen-wrong, unseen (all seeds)."""
    from omnilm.eval.plots import headless_pyplot, save_figure

    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pooled = {"seen, right": [], "seen, wrong": [], "unseen": []}
    for tables in per_seed:
        for row in tables["seen"]:
            pooled["seen, right" if row["correct"] else "seen, wrong"].append(row)
        pooled["unseen"] += tables["unseen"]
    for ax, key, label in ((axes[0], "confidence", "greedy completion confidence exp(mean log p)"),
                           (axes[1], "first_entropy", "entropy at the value's first token (nats)")):
        for name, rows in pooled.items():
            if rows:
                ax.hist([r[key] for r in rows], bins=20, alpha=0.45, density=True, label=f"{name} ({len(rows)})")
        ax.set_xlabel(label)
        ax.set_ylabel("density")
    axes[0].axvline(config.confident, linestyle="--", color="gray", linewidth=1)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def hallucination_report(results: dict[str, Any], config: HallucinationConfig) -> str:
    summary = results["summary"]
    names = list(summary[0])
    rows = [[name, pm([s[name]["probes"] for s in summary], 0)] + [pm([s[name][k] for s in summary])
            for k in ("correct", "confidence", "first_max_prob", "first_entropy", "confident_wrong", "plausible")]
            for name in names]
    unseen = [s["unseen"]["confident_wrong"] for s in summary]
    rate = sum(unseen) / len(unseen)
    verdict = ("reproduced" if rate >= 0.1 else "not reproduced")
    lines = ["# Knowledge acquisition: hallucination on unseen people", "",
             config.describe() + f"; {config.unseen_people} people never seen in training.", "",
             "Held-out-template probes; confident means exp(mean log p) of the greedy completion ≥ "
             f"{config.confident}.",
             ""]
    lines += table(["people", "probes", "accuracy", "completion confidence", "first-token max p", "first-token entropy",
                    "confident & wrong", "answer is a real value"], rows)
    lines += ["", f"Confident hallucination about unseen people: {pm(unseen)} of their probes get a wrong answer "
              f"with confidence ≥ {config.confident} — {verdict} (criterion: at least 10%).", "",
              "![hallucination](hallucination.png)", ""]
    return "\n".join(lines)
