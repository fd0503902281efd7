"""The shared pieces of the studies: corpora, the warm-up curriculum and probe sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

from omnilm.data.loader import TokenDataset
from omnilm.lab.knowledge.config import SCALES, KnowledgeConfig
from omnilm.lab.knowledge.experiment import loader, seen_probes, training_mixture, write_corpus


def tiny(**overrides: object) -> KnowledgeConfig:
    return KnowledgeConfig(**{"people": 8, "bios_per_person": 5, "vocab_size": 400, "batch_size": 2, "seq_len": 16,
                              "eval_examples": 1000} | overrides)


def test_warmup_curriculum_trains_on_the_first_people_then_everyone(tmp_path: Path) -> None:
    config = tiny(warmup_people=3, warmup_epochs=2.0)
    corpus = write_corpus(config, tmp_path)
    datasets, weights = training_mixture(config, corpus, tmp_path)
    subset = [json.loads(line) for line in (tmp_path / "warmup_tokens.jsonl").read_text().splitlines()]
    assert sorted({r["person_id"] for r in subset}) == [0, 1, 2] and len(subset) == 3 * 5
    tokens = len(TokenDataset.open(datasets["warmup"]))
    warmup_steps = math.ceil(2.0 * tokens / (2 * 16))
    assert weights(warmup_steps - 1) == {"warmup": 1.0} and weights(warmup_steps) == {"all": 1.0}
    batches = loader(datasets, config, seed=0, weights=weights)
    for _ in range(warmup_steps):
        batches.next_batch()
    assert batches.taken == {"warmup": 2 * warmup_steps, "all": 0}
    batches.next_batch()
    assert batches.taken["all"] == 2


def test_no_curriculum_by_default(tmp_path: Path) -> None:
    corpus = write_corpus(tiny(), tmp_path)
    assert training_mixture(tiny(), corpus, tmp_path) == ({"all": corpus.tokens}, None)


def test_probe_sets_cover_every_seen_fact_in_both_wordings(tmp_path: Path) -> None:
    corpus = write_corpus(tiny(), tmp_path)
    probes = seen_probes(corpus, tiny())
    assert list(probes) == ["held_out", "train_templates"]
    for probe_set in probes.values():
        assert len(probe_set.examples) == 8 * 6
        assert probe_set.baseline > 0
    trained = (tmp_path / "bios" / "train.jsonl").read_text()
    held_out = [json.loads(line)["text"] for line in (tmp_path / "bios" / "eval.jsonl").read_text().splitlines()]
    assert not any(sentence in trained for sentence in held_out)  # held-out wordings never occur in training


def test_scales() -> None:
    assert tiny().model_config() == SCALES["tiny"]
    assert tiny(scale="study", model={"n_layer": 2}).model_config()["n_layer"] == 2
