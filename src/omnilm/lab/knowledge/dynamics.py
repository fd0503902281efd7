"""The ``dynamics`` study: attribute loss and accuracy through pre-training, against the no-knowledge baseline.

One corpus of synthetic biographies (N people, 20 training templates per attribute), one tokenizer, then for
each seed a fresh model trained with AdamW and cosine decay without warmup (as in the study). Every
``eval_every`` steps the model completes held-out-template sentences of seen people; the attribute loss (value
tokens only) and accuracy are logged. Phases are detected per seed (``omnilm.lab.knowledge.phases``) and the
curves are plotted as mean ± std over seeds with the baseline as a line.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnilm.lab.knowledge.baseline import baseline_from_files
from omnilm.lab.knowledge.phases import detect_phases
from omnilm.lab.knowledge.scaling import mean_std
from omnilm.utils.atomic import write_json_atomic, write_text_atomic


@dataclass
class DynamicsConfig:
    people: int = 200  # N: people in the training biographies
    bios_per_person: int = 40  # biographies per person (fresh template draws and sentence orders)
    alpha: float = 0.0  # people sampled with weight i^-alpha
    vocab_size: int = 2048
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny", "max_seq_len": 256})
    steps: int = 1500
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 2e-3
    eval_every: int = 50
    eval_examples: int = 600  # held-out-template probes (seen people), a fixed random subset
    eps: float = 0.15  # the initial drop ends when the attribute loss is within eps of the baseline
    delta: float = 0.3  # knowledge emerges when the loss is delta below the baseline ...
    patience: int = 2  # ... for this many evaluations in a row
    seeds: int = 2


def prepare_corpus(config: DynamicsConfig, out: Path) -> dict[str, Path]:
    """Biographies, tokenizer and token shards (shared by every seed)."""
    from omnilm.data.sources import iter_documents
    from omnilm.data.synth.bios import BiosConfig, write_bios
    from omnilm.data.tokenize import tokenize_corpus
    from omnilm.tokenizer import train_bpe

    bios = out / "data" / "bios"
    write_bios(BiosConfig(people=config.people, bios_per_person=config.bios_per_person, alpha=config.alpha), bios)
    tokenizer_dir = out / "data" / "tokenizer"
    texts = (d.text for d in iter_documents([str(bios / "train.jsonl")]))
    train_bpe(texts, config.vocab_size).save(tokenizer_dir)
    tokens = out / "data" / "tokens"
    tokenize_corpus([str(bios / "train.jsonl")], tokenizer_dir, tokens, val_fraction=0.0, workers=1, progress=False)
    return {"bios": bios, "tokenizer": tokenizer_dir, "tokens": tokens}


def train_seed(config: DynamicsConfig, paths: dict[str, Path], examples: list, tokenizer: Any, seed: int,
               out: Path) -> list[dict[str, float]]:
    """Train one model; returns the evaluation rows (step, attribute loss, accuracy, per attribute)."""
    from omnilm.data.loader import BatchLoader, TokenDataset
    from omnilm.eval.attributes import evaluate_examples
    from omnilm.model.config import load_model_config
    from omnilm.model.transformer import Transformer
    from omnilm.objectives.lm import causal_lm_loss
    from omnilm.train.config import TrainConfig
    from omnilm.train.trainer import Trainer

    torch.manual_seed(seed)
    model = Transformer(load_model_config(dict(config.model) | {"vocab_size": tokenizer.vocab_size,
                                                                "eos_token_id": tokenizer.eos_id,
                                                                "pad_token_id": tokenizer.pad_id}))
    loader = BatchLoader(TokenDataset.open(paths["tokens"]), config.batch_size, config.seq_len, seed=seed)
    train = TrainConfig(max_steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len, lr=config.lr,
                        warmup_steps=0, schedule="cosine", eval_every=config.eval_every, log_every=config.eval_every,
                        checkpoint_every=0, keep_checkpoints=1, progress=False, device="cpu", seed=seed)
    run = out / f"seed-{seed}"
    Trainer(model, causal_lm_loss, loader, train, run, tokenizer=tokenizer,
            evaluate=lambda m: evaluate_examples(m, tokenizer, examples)).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if "accuracy" in r]


def run_dynamics(config: DynamicsConfig, out: str | Path) -> dict[str, Any]:
    """Run the study into ``out``: ``dynamics.png``, ``results.json`` and ``report.md``."""
    from omnilm.eval.attributes import build_examples, read_jsonl
    from omnilm.tokenizer import Tokenizer

    out = Path(out)
    paths = prepare_corpus(config, out)
    tokenizer = Tokenizer.from_dir(paths["tokenizer"])
    records = read_jsonl(paths["bios"] / "eval.jsonl")
    if len(records) > config.eval_examples:
        records = random.Random(0).sample(records, config.eval_examples)
    examples = build_examples(records, tokenizer)
    marginals = json.loads((paths["bios"] / "marginals.json").read_text(encoding="utf-8"))
    per_attribute = baseline_from_files(marginals, records, tokenizer)
    counts = {a: sum(e.attribute == a for e in examples) for a in per_attribute}
    baseline = sum(per_attribute[a] * counts[a] for a in per_attribute) / max(sum(counts.values()), 1)
    curves, phases = [], []
    for seed in range(config.seeds):
        rows = train_seed(config, paths, examples, tokenizer, seed, out)
        curves.append(rows)
        found = detect_phases([r["step"] for r in rows], [r["loss"] for r in rows], baseline, config.eps,
                              config.delta, patience=config.patience)
        phases.append(asdict(found))
    results = {"config": asdict(config), "baseline": baseline, "baseline_per_attribute": per_attribute,
               "phases": phases, "curves": curves}
    write_json_atomic(out / "results.json", results)
    plot_dynamics(curves, baseline, out / "dynamics.png")
    write_text_atomic(out / "report.md", dynamics_report(results))
    return results


def _mean_std_curve(curves: list[list[dict[str, float]]], key: str) -> tuple[list[int], list[float], list[float]]:
    steps = [r["step"] for r in curves[0]]
    stats = [mean_std([c[i][key] for c in curves]) for i in range(len(steps))]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def plot_dynamics(curves: list[list[dict[str, float]]], baseline: float, path: Path) -> None:
    """Attribute loss (with the baseline line) and accuracy vs step, mean ± std over seeds."""
    from omnilm.eval.plots import headless_pyplot, save_figure

    plt = headless_pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((ax_loss, "loss", "attribute loss (nats/token)"), (ax_acc, "accuracy", "accuracy")):
        steps, mean, std = _mean_std_curve(curves, key)
        ax.plot(steps, mean, label=f"mean of {len(curves)} seeds")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], alpha=0.3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    ax_loss.axhline(baseline, color="gray", linestyle="--", label="no-knowledge baseline")
    ax_loss.legend()
    save_figure(fig, path)


def dynamics_report(results: dict[str, Any]) -> str:
    config, phases = results["config"], results["phases"]
    lengths = [p["plateau_length"] for p in phases if p["plateau_length"] is not None]
    final = [c[-1]["accuracy"] for c in results["curves"]]
    mean_acc, std_acc = mean_std(final)
    three = len(lengths) == len(phases)
    lines = [
        "# Knowledge acquisition: training dynamics", "",
        f"N = {config['people']} people, {config['bios_per_person']} biographies each, model {config['model']}, "
        f"{config['steps']} steps of {config['batch_size']}×{config['seq_len']} tokens, lr {config['lr']} cosine "
        f"without warmup, {config['seeds']} seed(s).", "",
        f"No-knowledge baseline (attribute loss of the marginal distribution): {results['baseline']:.3f} nats/token.",
        "", "| seed | end of initial drop | knowledge emerges | plateau length | final accuracy |",
        "|---:|---:|---:|---:|---:|"]
    for seed, (p, curve) in enumerate(zip(phases, results["curves"], strict=True)):
        lines.append(f"| {seed} | {p['drop_end']} | {p['emergence_step']} | {p['plateau_length']} | "
                     f"{curve[-1]['accuracy']:.3f} |")
    lines += ["", f"Final accuracy {mean_acc:.3f} ± {std_acc:.3f}."]
    if lengths:
        mean_len, std_len = mean_std([float(x) for x in lengths])
        lines.append(f"Plateau length {mean_len:.0f} ± {std_len:.0f} steps.")
    verdict = ("reproduced: a drop to the baseline, a plateau near it, then knowledge emerging in every seed"
               if three else "not reproduced in every seed at this scale (see the table)")
    lines += ["", f"Three-phase curve: {verdict}.", "", "![dynamics](dynamics.png)", ""]
    return "\n".join(lines)
