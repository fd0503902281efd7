"""The pieces every study is made of: a biography corpus, probe sets with their baseline, and training runs.

A study writes one or more corpora (biographies, a tokenizer, token shards), turns probe sentences (held-out
or training wordings) into probes, and trains fresh models with AdamW and cosine decay without warmup,
evaluating the probes every ``eval_every`` steps. The evaluation rows (step, attribute loss and accuracy,
overall and per attribute) are what the studies analyse and plot.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.lab.knowledge.baseline import baseline_from_files
from omnilm.lab.knowledge.config import PROBE_SETS, KnowledgeConfig
from omnilm.lab.knowledge.phases import detect_phases

Row = dict[str, float]
# The probe file of each probe set (see omnilm.data.synth.bios).
PROBE_FILES = {"held_out": "eval.jsonl", "train_templates": "eval_train_templates.jsonl"}


@dataclass
class Corpus:
    """Biography files, the tokenizer trained on them and the token shards of ``train.jsonl``."""

    bios: Path
    tokenizer_dir: Path
    tokens: Path

    @property
    def tokenizer(self) -> Any:
        from omnilm.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.tokenizer_dir)

    def marginals(self) -> dict[str, dict[str, float]]:
        return json.loads((self.bios / "marginals.json").read_text(encoding="utf-8"))


def write_corpus(config: KnowledgeConfig, out: Path, unseen_people: int = 0,
                 tokenizer_dir: Path | None = None) -> Corpus:
    """Biographies for ``config`` (people, alpha, ...) under ``out``; a tokenizer is trained unless given."""
    from omnilm.data.synth.bios import BiosConfig, write_bios
    from omnilm.tokenizer import train_bpe

    bios = out / "bios"
    write_bios(BiosConfig(people=config.people, unseen_people=unseen_people, bios_per_person=config.bios_per_person,
                          alpha=config.alpha), bios)
    if tokenizer_dir is None:
        tokenizer_dir = out / "tokenizer"
        train_bpe((r["text"] for r in _read(bios / "train.jsonl")), config.vocab_size).save(tokenizer_dir)
    return Corpus(bios, tokenizer_dir, tokenize(bios / "train.jsonl", tokenizer_dir, out / "tokens"))


def tokenize(source: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Token shards of one jsonl file of biographies (no validation split: probes measure what we need)."""
    from omnilm.data.tokenize import tokenize_corpus

    tokenize_corpus([str(source)], tokenizer_dir, out, val_fraction=0.0, workers=1, progress=False)
    return out


def biographies_of(corpus: Corpus, keep: Callable[[int], bool], out: Path) -> Path:
    """Token shards of the biographies whose person id passes ``keep`` (a subset of the people)."""
    from omnilm.data.synth.io import write_jsonl

    subset = out.with_suffix(".jsonl")
    write_jsonl(subset, (r for r in _read(corpus.bios / "train.jsonl") if keep(int(r["person_id"]))))
    return tokenize(subset, corpus.tokenizer_dir, out)


@dataclass
class Probes:
    """Completion probes of one group of people, and the no-knowledge baseline they are judged against."""

    examples: list
    baseline: float
    baseline_per_attribute: dict[str, float]

    @classmethod
    def build(cls, records: list[dict[str, Any]], marginals: Mapping[str, Mapping[str, float]], tokenizer: Any,
              limit: int, seed: int = 0) -> Probes:
        """Probes from eval records (at most ``limit``, a fixed random subset); the baseline uses ``marginals``."""
        from omnilm.eval.attributes import build_examples

        if len(records) > limit:
            records = random.Random(seed).sample(records, limit)
        examples = build_examples(records, tokenizer)
        per_attribute = baseline_from_files(marginals, records, tokenizer)
        counts = {a: sum(e.attribute == a for e in examples) for a in per_attribute}
        baseline = sum(per_attribute[a] * counts[a] for a in per_attribute) / max(sum(counts.values()), 1)
        return cls(examples, baseline, per_attribute)

    @classmethod
    def of_corpus(cls, corpus: Corpus, limit: int, keep: Callable[[int], bool] | None = None,
                  file: str = "eval.jsonl") -> Probes:
        """Probes from one of the corpus's probe files, of the people ``keep`` accepts (default: all); the
        baseline uses the marginals of the whole corpus, i.e. of what the model is trained on."""
        records = [r for r in _read(corpus.bios / file) if keep is None or keep(int(r["person_id"]))]
        return cls.build(records, corpus.marginals(), corpus.tokenizer, limit)


def seen_probes(corpus: Corpus, config: KnowledgeConfig,
                keep: Callable[[int], bool] | None = None) -> dict[str, Probes]:
    """The held-out-template probes and the training-template probes of seen people (PROBE_SETS order)."""
    return {name: Probes.of_corpus(corpus, config.eval_examples, keep, PROBE_FILES[name]) for name in PROBE_SETS}


def new_model(config: KnowledgeConfig, tokenizer: Any, seed: int) -> nn.Module:
    """A freshly initialised decoder of the config's scale, seeded."""
    from omnilm.model.config import load_model_config
    from omnilm.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(load_model_config(config.model_config() | {
        "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}))


def evaluator(tokenizer: Any, probe_sets: Mapping[str, Probes]) -> Callable[[nn.Module], Row]:
    """Evaluation function for the trainer: the first probe set's metrics unprefixed, the others as ``name/...``."""
    from omnilm.eval.attributes import evaluate_examples

    def evaluate(model: nn.Module) -> Row:
        row: Row = {}
        for index, (name, probes) in enumerate(probe_sets.items()):
            metrics = evaluate_examples(model, tokenizer, probes.examples)
            row |= metrics if index == 0 else {f"{name}/{key}": value for key, value in metrics.items()}
        return row

    return evaluate


def loader(datasets: Mapping[str, Path], config: KnowledgeConfig, seed: int,
           weights: Mapping[str, float] | Callable[[int], Mapping[str, float]] | None = None) -> Any:
    """A seeded batch loader over token shards; ``weights`` mixes several (a function of the step: curriculum)."""
    from omnilm.data.loader import BatchLoader, TokenDataset

    opened = {name: TokenDataset.open(path) for name, path in datasets.items()}
    return BatchLoader(opened, config.batch_size, config.seq_len, seed=seed, weights=weights)


def train(config: KnowledgeConfig, model: nn.Module, batches: Any, evaluate: Callable[[nn.Module], Row],
          seed: int, out: Path, steps: int | None = None, lr: float | None = None, eval_every: int | None = None,
          schedule_steps: int | None = None, objective: Callable[..., Any] | None = None,
          warmup_steps: int = 0) -> list[Row]:
    """Train ``model`` in place with the study's optimiser settings; returns the evaluation rows.

    ``steps``, ``lr`` and ``eval_every`` default to the config's; ``schedule_steps`` is the cosine horizon
    (default: ``steps``), longer when runs of different lengths should share one schedule; ``objective``
    replaces the causal-LM loss (multi-token or selective training); ``warmup_steps`` of linear warmup precede
    the cosine (none in the knowledge studies, as in the published study).
    """
    from omnilm.objectives.lm import causal_lm_loss
    from omnilm.train.config import TrainConfig
    from omnilm.train.trainer import Trainer

    settings = TrainConfig(max_steps=steps or config.steps, batch_size=config.batch_size, seq_len=config.seq_len,
                           lr=lr or config.lr, warmup_steps=warmup_steps, schedule="cosine",
                           schedule_steps=schedule_steps,
                           eval_every=eval_every or config.eval_every, log_every=eval_every or config.eval_every,
                           checkpoint_every=0, keep_checkpoints=1, progress=False,
                           device="cpu", seed=seed)
    Trainer(model, objective or causal_lm_loss, batches, settings, out, evaluate=evaluate).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if "accuracy" in r]


class Snapshots:
    """Evaluation function wrapper that keeps a CPU copy of the model's weights at every evaluation: ``states[k]``
    is the state at the k-th evaluation (1-based; the trainer's final evaluation is the last)."""

    def __init__(self, evaluate: Callable[[nn.Module], Row] | None = None) -> None:
        self.evaluate, self.states = evaluate, {}
        self.step = 0

    def __call__(self, model: nn.Module) -> Row:
        self.step += 1
        self.states[self.step] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return self.evaluate(model) if self.evaluate is not None else {}


def training_mixture(config: KnowledgeConfig, corpus: Corpus, out: Path) -> tuple[dict[str, Path], Any]:
    """Datasets and mixture weights for pre-training: everyone, or the warm-up curriculum.

    With ``warmup_people`` > 0 the first ``warmup_epochs`` passes over the biographies of people
    1..warmup_people come first (a step count rounded up from their tokens), then all people uniformly.
    """
    import math

    from omnilm.data.loader import TokenDataset

    if config.warmup_people <= 0 or config.warmup_epochs <= 0:
        return {"all": corpus.tokens}, None
    subset = biographies_of(corpus, lambda person: person < config.warmup_people, out / "warmup_tokens")
    tokens = len(TokenDataset.open(subset))
    warmup_steps = math.ceil(config.warmup_epochs * tokens / (config.batch_size * config.seq_len))

    def weights(step: int) -> dict[str, float]:
        return {"warmup": 1.0} if step < warmup_steps else {"all": 1.0}

    return {"warmup": subset, "all": corpus.tokens}, weights


def pretrain(config: KnowledgeConfig, corpus: Corpus, probes: Mapping[str, Probes], seed: int, out: Path,
             mixture: tuple[dict[str, Path], Any] | None = None,
             schedule_steps: int | None = None) -> tuple[list[Row], nn.Module]:
    """One seed of pre-training a fresh model on the corpus (through ``mixture``, default: every biography)."""
    tokenizer = corpus.tokenizer
    model = new_model(config, tokenizer, seed)
    datasets, weights = mixture or ({"all": corpus.tokens}, None)
    rows = train(config, model, loader(datasets, config, seed, weights), evaluator(tokenizer, probes), seed, out,
                 schedule_steps=schedule_steps)
    return rows, model


def phases_of(curve: list[dict[str, float]], baseline: float, config: KnowledgeConfig,
              prefix: str = "") -> dict[str, Any]:
    """The detected phases of one evaluation curve, as a dict."""
    found = detect_phases([r["step"] for r in curve], [r[prefix + "loss"] for r in curve], baseline, config.eps,
                          config.delta, patience=config.patience)
    return asdict(found)


def _read(path: Path) -> Iterable[dict[str, Any]]:
    from omnilm.eval.attributes import read_jsonl

    return read_jsonl(path)
