"""The ``objectives`` lab: which pre-training objective buys the best fine-tuned classifier per FLOP?

On one biography corpus (the knowledge lab's) and one tokenizer (with BERT's and T5's special tokens, so every
model has the same vocabulary), four arms are pre-trained for the same number of training FLOPs:
- ``decoder``: a causal decoder (the knowledge lab's model), next-token loss;
- ``bert``: a post-norm encoder of the same depth and width, masked LM (15 %, 80/10/10);
- ``electra``: the same encoder as discriminator plus a generator a quarter as wide (shared embeddings),
  replaced-token detection (λ = 50); the FLOPs count both networks;
- ``t5``: a T5 v1.1 with half the layers in the encoder and half in the decoder (same width), span corruption
  (15 %, mean span 3) on inputs of ``seq_len`` tokens.
The budget is the decoder's ``steps`` steps; every other arm trains for the steps that cost the same FLOPs
(rounded to a multiple of 4), on one cosine schedule, and a copy of its weights is kept after each quarter.
FLOPs per step are 6 × the weights each token passes through (vocabulary projections included) plus attention's
12 · layers · width · context per token; T5 counts its encoder tokens and its decoder tokens separately.

Each kept copy in ``quarters`` (and, as the no-pre-training baseline, a fresh model of each architecture) is
fine-tuned on the attribute-type task of ``lab.classify`` (training wordings of ``finetune_people`` people) and
tested on other people's sentences in held-out wordings. Every arm runs ``seeds`` times (pre-training and
fine-tuning seed together); the report gives the mean and each seed's accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.lab.classify import FinetuneConfig
from omnilm.lab.knowledge.config import KnowledgeConfig

ARMS = ("decoder", "bert", "electra", "t5")
# The architecture each arm fine-tunes (ELECTRA's discriminator is BERT's encoder): the baselines' rows.
ARCHITECTURES = {"decoder": "decoder", "bert": "encoder", "electra": "encoder", "t5": "t5"}
SENTINELS = 100


@dataclass
class ObjectivesLabConfig(KnowledgeConfig):
    """N = 200 people, 4 layers of width 128, a budget of 400 decoder steps of 32×64 tokens, 2 seeds, 60
    labelled sentences: 505 s on 2 cores."""

    people: int = 200
    steps: int = 400
    batch_size: int = 32
    seq_len: int = 64
    seeds: int = 2
    #: Peak learning rate of each arm's pre-training (cosine without warmup; an arm not listed uses ``lr``).
    arm_lr: dict[str, float] = field(default_factory=lambda: {"decoder": 2e-3, "bert": 1e-3, "electra": 1e-3,
                                                              "t5": 2e-3})
    #: Linear warmup over this fraction of each arm's steps before the cosine decay (post-norm encoders need it).
    warmup_fraction: float = 0.1
    #: Which quarters of the budget are fine-tuned (4 = the whole budget).
    quarters: list[int] = field(default_factory=lambda: [1, 2, 4])
    #: ELECTRA's discriminator loss weight λ and the generator's width divisor.
    disc_weight: float = 50.0
    generator_size_divisor: int = 4
    #: People whose training-wording sentences are the fine-tuning set (6 sentences each).
    finetune_people: int = 10
    #: Test sentences per test set (other people; held-out wordings, training wordings).
    test_examples: int = 600
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        from omnilm.config import ConfigError, from_dict

        if isinstance(self.finetune, dict):  # from a YAML/JSON mapping
            self.finetune = from_dict(FinetuneConfig, self.finetune, "finetune")
        if not self.quarters or any(q not in (1, 2, 3, 4) for q in self.quarters):
            raise ConfigError(f"quarters must be a non-empty list of 1..4, got {self.quarters}")


@dataclass
class Arm:
    """One pre-training arm, ready to train: model, batches, objective, FLOPs per step."""

    model: nn.Module
    batches: Any
    objective: Any
    flops_per_step: float


def shapes(config: ObjectivesLabConfig, tokenizer: Any) -> dict[str, Any]:
    """The decoder's model config and the encoder's and T5's of the same depth and width."""
    from omnilm.model.config import load_model_config
    from omnilm.model.encoder import EncoderConfig
    from omnilm.model.t5 import T5Config

    ids = encoder_ids(tokenizer)
    decoder = load_model_config(config.model_config() | {"vocab_size": tokenizer.vocab_size})
    encoder = EncoderConfig(family="electra", vocab_size=tokenizer.vocab_size, n_layer=decoder.n_layer,
                            n_head=decoder.n_head, d_model=decoder.d_model, max_seq_len=config.seq_len + 1,
                            dropout=0.0, pad_token_id=ids["pad"])
    half = max(decoder.n_layer // 2, 1)
    t5 = T5Config(vocab_size=tokenizer.vocab_size, d_model=decoder.d_model, head_dim=decoder.dim_per_head,
                  n_head=decoder.n_head, d_ff=decoder.ff_dim, n_layer=half, dropout=0.0, pad_token_id=ids["pad"],
                  eos_token_id=tokenizer.eos_id, decoder_start_token_id=ids["pad"])
    return {"decoder": decoder, "encoder": encoder, "t5": t5}


def encoder_ids(tokenizer: Any) -> dict[str, int]:
    from omnilm.train.encoder_stages import encoder_ids as ids

    return ids(tokenizer)


def build_arm(name: str, config: ObjectivesLabConfig, tokenizer: Any, tokens: Path, seed: int) -> Arm:
    """A freshly initialised arm (seeded), with its batch source over ``tokens`` and its FLOPs per step."""
    from omnilm.lab.knowledge.experiment import loader
    from omnilm.model.electra import ElectraPretraining
    from omnilm.model.encoder import EncoderForMaskedLM
    from omnilm.model.moe import active_params
    from omnilm.model.t5 import T5
    from omnilm.model.transformer import Transformer
    from omnilm.objectives.lm import causal_lm_loss
    from omnilm.objectives.seq2seq import seq2seq_loss
    from omnilm.objectives.span_corruption import SpanCorruptionConfig, compute_input_and_target_lengths
    from omnilm.train.encoder_stages import (
        MASKING_OPTIONS,
        TransformedBatches,
        electra_objective,
        masking_fn,
        mlm_objective,
        with_sample_seed,
    )
    from omnilm.train.seq2seq_stages import NumpyTransformedBatches, span_corruption_fn

    shape = shapes(config, tokenizer)
    B, T = config.batch_size, config.seq_len
    torch.manual_seed(seed)
    if name == "decoder":
        model = Transformer(shape["decoder"])
        c = model.config
        # active_params leaves out embedding tables; a tied head's projection is compute all the same.
        per_token = 6 * (active_params(model) + (c.vocab_size * c.d_model if c.tie_embeddings else 0)) \
            + 12 * c.n_layer * c.n_head * c.dim_per_head * T
        return Arm(model, loader({"all": tokens}, config, seed), causal_lm_loss, per_token * B * T)
    if name in ("bert", "electra"):
        masking = with_sample_seed(masking_fn(T, tokenizer, MASKING_OPTIONS))
        masked = TransformedBatches(loader({"all": tokens}, config, seed), masking, seed, 0)
        if name == "bert":
            model = EncoderForMaskedLM(replace(shape["encoder"], family="bert"))
            return Arm(model, masked, mlm_objective, model.flops_per_token(T) * B * T)
        model = ElectraPretraining.fresh(shape["encoder"], config.generator_size_divisor)
        return Arm(model, masked, electra_objective(config.disc_weight), model.flops_per_token(T) * B * T)
    if name == "t5":
        spans = SpanCorruptionConfig()
        window, targets = compute_input_and_target_lengths(T, spans)
        model = T5(shape["t5"])
        batches = NumpyTransformedBatches(loader({"all": tokens}, replace(config, seq_len=window - 1), seed),
                                          span_corruption_fn(tokenizer, spans, SENTINELS), seed, 0)
        return Arm(model, batches, seq2seq_loss, model.flops_per_example(T, targets) * B)
    raise ValueError(f"unknown arm {name!r}; expected one of {ARMS}")


def classifier(architecture: str, config: ObjectivesLabConfig, tokenizer: Any, classes: list[str], seed: int,
               state: dict[str, torch.Tensor] | None = None, arm: str | None = None) -> nn.Module:
    """A classifier of ``architecture`` (decoder / encoder / t5), fresh (seeded) or with the pre-trained weights
    ``state`` of ``arm`` (ELECTRA's: its discriminator's encoder)."""
    from omnilm.lab.classify import DecoderClassifier, EncoderClassifier, TextToTextClassifier
    from omnilm.model.encoder import EncoderForSequenceClassification
    from omnilm.model.t5 import T5
    from omnilm.model.transformer import Transformer

    shape = shapes(config, tokenizer)
    max_len = config.finetune.max_len
    torch.manual_seed(seed)
    if architecture == "decoder":
        model = Transformer(shape["decoder"])
        if state is not None:
            model.load_state_dict(state)
        return DecoderClassifier(model, len(classes), tokenizer.eos_id, max_len)
    if architecture == "encoder":
        model = EncoderForSequenceClassification(replace(shape["encoder"], family="bert", num_labels=len(classes),
                                                         max_seq_len=max(max_len, config.seq_len + 1)))
        if state is not None:
            prefix = "discriminator.encoder." if arm == "electra" else "encoder."
            encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            # The classifier's position table may be longer than the pre-trained one: copy what was trained.
            positions = encoder.pop("pos_emb.weight")
            model.encoder.load_state_dict(encoder, strict=False)
            with torch.no_grad():
                model.encoder.pos_emb.weight[:len(positions)] = positions
        return EncoderClassifier(model, encoder_ids(tokenizer), max_len)
    if architecture == "t5":
        model = T5(shape["t5"])
        if state is not None:
            model.load_state_dict(state)
        names = [tokenizer.encode(name.replace("_", " "), special=False) for name in classes]
        return TextToTextClassifier(model, names, max_len)
    raise ValueError(f"unknown architecture {architecture!r}")


def run_objectives_lab(config: ObjectivesLabConfig, out: str | Path) -> dict[str, Any]:
    """Run the lab into ``out``: ``objectives.png``, ``results.json``, ``report.md``."""
    from omnilm.lab.classify import accuracy, attribute_task, encode_examples, finetune
    from omnilm.lab.knowledge.experiment import Snapshots, train, write_corpus
    from omnilm.tokenizer.families import ensure_family_tokens, sentinel_ids

    out = Path(out)
    corpus = write_corpus(config, out / "data")
    tokenizer = corpus.tokenizer
    ensure_family_tokens(tokenizer, "bert")  # one vocabulary for every arm
    sentinel_ids(tokenizer, SENTINELS)
    encoder_ids(tokenizer)
    task = attribute_task(corpus.bios, config.finetune_people, config.test_examples)
    train_set = encode_examples(tokenizer, task.train)
    tests = {name: encode_examples(tokenizer, rows) for name, rows in task.tests.items()}

    def scores(model: nn.Module, seed: int) -> dict[str, float]:
        finetune(model, train_set, config.finetune, seed)
        return {name: accuracy(model, rows) for name, rows in tests.items()}

    budget = build_arm("decoder", config, tokenizer, corpus.tokens, 0).flops_per_step * config.steps
    runs: dict[str, dict[str, Any]] = {}
    for name in ARMS:
        probe = build_arm(name, config, tokenizer, corpus.tokens, 0)
        steps = max(4, 4 * round(budget / probe.flops_per_step / 4))
        run = {"steps": steps, "flops_per_step": probe.flops_per_step, "lr": config.arm_lr.get(name, config.lr),
               "params": sum(p.numel() for p in probe.model.parameters()),
               "points": [{"quarter": q, "flops": probe.flops_per_step * steps * q / 4, "held_out": [],
                           "train_templates": []} for q in config.quarters]}
        for seed in range(config.seeds):
            arm = build_arm(name, config, tokenizer, corpus.tokens, seed)
            snapshots = Snapshots()
            train(config, arm.model, arm.batches, snapshots, seed, out / name / f"seed-{seed}", steps=steps,
                  lr=run["lr"], eval_every=steps // 4, objective=arm.objective,
                  warmup_steps=round(config.warmup_fraction * steps))
            run.setdefault("loss", []).append(final_loss(out / name / f"seed-{seed}"))
            for point in run["points"]:
                tuned = classifier(ARCHITECTURES[name], config, tokenizer, task.classes, seed,
                                   snapshots.states[point["quarter"]], name)
                for test, value in scores(tuned, seed).items():
                    point[test].append(value)
        runs[name] = run
    baselines = {}
    for architecture in dict.fromkeys(ARCHITECTURES.values()):
        found: dict[str, list[float]] = {"held_out": [], "train_templates": []}
        for seed in range(config.seeds):
            for test, value in scores(classifier(architecture, config, tokenizer, task.classes, seed), seed).items():
                found[test].append(value)
        baselines[architecture] = found
    return {"config": asdict(config), "budget_flops": budget, "runs": runs, "baselines": baselines,
            "unigram_entropy": unigram_entropy(corpus.tokens),
            "task": {"classes": task.classes, "train": len(train_set), **{k: len(v) for k, v in tests.items()}}}


def unigram_entropy(tokens: Path) -> float:
    """Entropy (nats) of the corpus's token frequencies: the loss of a model that ignores the context."""
    import numpy as np

    from omnilm.data.loader import TokenDataset

    dataset = TokenDataset.open(tokens)
    counts = np.bincount(dataset.read(0, len(dataset)))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def final_loss(run: Path) -> float:
    """The last logged training loss of a run (its objective's own loss: not comparable across objectives)."""
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["loss"] for r in rows if "loss" in r][-1]


TESTS = (("held_out", "held-out wordings"), ("train_templates", "training wordings"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _cell(values: list[float]) -> str:
    """Mean, then every seed's value: ``0.512 (0.500, 0.524)``."""
    return f"{_mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def write_outputs(results: dict[str, Any], config: ObjectivesLabConfig, out: Path) -> None:
    """Plot and report from ``results`` (also from a saved ``results.json``)."""
    from omnilm.utils.atomic import write_text_atomic

    plot_objectives(results, out / "objectives.png")
    write_text_atomic(out / "report.md", objectives_report(results, config))


def plot_objectives(results: dict[str, Any], path: Path) -> None:
    """Fine-tuned accuracy against pre-training FLOPs, one line per arm starting at its architecture's
    no-pre-training baseline; dots are single seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TESTS), figsize=(6 * len(TESTS), 4.2))
    for ax, (test, title) in zip(axes, TESTS, strict=True):
        for name, run in results["runs"].items():
            base = results["baselines"][ARCHITECTURES[name]][test]
            xs = [0.0] + [p["flops"] for p in run["points"]]
            seeds = [base] + [p[test] for p in run["points"]]
            line, = ax.plot(xs, [_mean(v) for v in seeds], marker="o", label=name)
            for x, values in zip(xs, seeds, strict=True):
                ax.scatter([x] * len(values), values, s=10, color=line.get_color(), alpha=0.5)
        ax.set_xlabel("pre-training FLOPs (0 = no pre-training)")
        ax.set_ylabel("fine-tuned accuracy")
        ax.set_title(f"attribute type, {title} (other people)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def objectives_report(results: dict[str, Any], config: ObjectivesLabConfig) -> str:
    from omnilm.lab.knowledge.report import table

    runs, baselines, task = results["runs"], results["baselines"], results["task"]
    lines = [f"# Objectives lab: N = {config.people} people, equal pre-training FLOPs "
             f"({results['budget_flops']:.2e}: {config.steps} decoder steps of {config.batch_size}×{config.seq_len} "
             f"tokens), {config.seeds} seed(s)", ""]
    rows = []
    for architecture, found in baselines.items():
        rows.append([f"{architecture}, no pre-training", "0", "0", "-", _cell(found["held_out"]),
                     _cell(found["train_templates"])])
    for name, run in runs.items():
        for point in run["points"]:
            rows.append([name, f"{point['flops']:.2e}", str(run["steps"] * point["quarter"] // 4),
                         f"{run['params'] / 1e6:.2f}M", _cell(point["held_out"]), _cell(point["train_templates"])])
    lines += table(["pre-training", "FLOPs", "steps", "params", "acc. held-out wordings: mean (seeds)",
                    "acc. training wordings: mean (seeds)"], rows)
    finetune = config.finetune
    lines += ["", f"Task: which of {len(task['classes'])} attributes a sentence states; fine-tuned on {task['train']} "
              f"training-wording sentences of {config.finetune_people} people ({finetune.steps} steps of "
              f"{finetune.batch_size}, lr {finetune.lr}), tested on {task['held_out']} sentences of other people in "
              "held-out wordings and as many in training wordings. Classifiers: encoders pool [CLS] (tanh) into a "
              "linear layer; the decoder reads its hidden state at an appended EOS into a linear layer; T5 writes "
              "the class name and predicts the name of highest likelihood. ELECTRA fine-tunes its discriminator; "
              "its FLOPs include the generator's.", ""]
    losses = ", ".join(f"{name} {_mean(run['loss']):.2f}" for name, run in runs.items())
    lines += [f"Final pre-training losses, each in its own objective (mean over seeds): {losses}; for reference, "
              f"a model that ignores the context scores the corpus's unigram entropy, "
              f"{results['unigram_entropy']:.2f} nats (ELECTRA's loss is generator MLM + λ · discriminator).", ""]
    if "bert" in runs and "electra" in runs:
        gaps = [f"{_mean(e['held_out']) - _mean(b['held_out']):+.3f} at {e['quarter']}/4"
                for b, e in zip(runs["bert"]["points"], runs["electra"]["points"], strict=True)]
        lines += [f"ELECTRA minus BERT (held-out wordings, mean over seeds): {', '.join(gaps)} of the budget.", ""]
    return "\n".join(lines)
