"""The objectives lab end to end at toy size, and its classifiers on tasks whose answer is known."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from omnilm.cli import main
from omnilm.lab.classify import (
    DecoderClassifier,
    EncoderClassifier,
    FinetuneConfig,
    TextToTextClassifier,
    accuracy,
    attribute_task,
    finetune,
)
from omnilm.model.config import load_model_config
from omnilm.model.encoder import EncoderConfig, EncoderForSequenceClassification
from omnilm.model.t5 import T5, T5Config
from omnilm.model.transformer import Transformer

TOY = {"people": 10, "bios_per_person": 5, "vocab_size": 400, "batch_size": 2, "seq_len": 16, "steps": 8,
       "seeds": 2, "quarters": [2, 4], "finetune_people": 5, "test_examples": 24,
       "finetune": {"steps": 4, "batch_size": 8}, "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "n_kv_head": 1}}


def test_objectives_lab_runs_at_equal_flops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "lab.json").write_text(json.dumps(TOY))
    assert main(["lab", "objectives", "--config", str(tmp_path / "lab.json"), "--out", str(tmp_path / "out")]) == 0
    report = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    runs, budget = results["runs"], results["budget_flops"]
    assert list(runs) == ["decoder", "bert", "electra", "t5"]
    assert runs["decoder"]["steps"] == 8 and runs["decoder"]["points"][-1]["flops"] == pytest.approx(budget)
    for name, run in runs.items():
        # Equal compute: every arm's full budget is the decoder's, up to rounding its steps to a multiple of 4.
        assert abs(run["points"][-1]["flops"] - budget) <= 2 * run["flops_per_step"], name
        assert [p["quarter"] for p in run["points"]] == [2, 4]
        assert run["points"][0]["flops"] == pytest.approx(run["points"][-1]["flops"] / 2)
        for point in run["points"]:
            for test in ("held_out", "train_templates"):
                assert len(point[test]) == 2 and all(0.0 <= v <= 1.0 for v in point[test])
    # ELECTRA pays for its generator too: fewer steps than BERT for the same FLOPs.
    assert runs["electra"]["flops_per_step"] > runs["bert"]["flops_per_step"]
    assert runs["electra"]["steps"] <= runs["bert"]["steps"]
    assert set(results["baselines"]) == {"decoder", "encoder", "t5"}
    assert results["task"]["train"] == 5 * 6 and results["task"]["held_out"] == 24
    assert "| electra |" in report and "encoder, no pre-training" in report and "Wall time" in report
    assert "ELECTRA minus BERT" in report and (tmp_path / "out" / "objectives.png").is_file()
    assert main(["lab", "objectives", "--out", str(tmp_path / "out"), "--report-only"]) == 0


def test_attribute_task_keeps_people_and_wordings_apart(tmp_path: Path) -> None:
    from omnilm.data.synth.bios import BiosConfig, write_bios

    write_bios(BiosConfig(people=12, bios_per_person=2), tmp_path)
    task = attribute_task(tmp_path, people=4, test_examples=30)
    assert len(task.train) == 4 * 6 and len(task.tests["held_out"]) == len(task.tests["train_templates"]) == 30
    owner: dict[str, int] = {}
    for file in ("eval.jsonl", "eval_train_templates.jsonl"):
        for line in (tmp_path / file).read_text().splitlines():
            record = json.loads(line)
            owner[record["text"]] = record["person_id"]
    tuned = {owner[text] for text, _ in task.train}
    assert tuned == {0, 1, 2, 3}
    for rows in task.tests.values():
        assert not {owner[text] for text, _ in rows} & tuned
    # Held-out wordings are sentences no training text contains.
    corpus = (tmp_path / "train.jsonl").read_text()
    assert not any(text in corpus for text, _ in task.tests["held_out"])
    assert all(0 <= label < 6 for _, label in task.train) and len({label for _, label in task.train}) == 6


def separable(n: int, seed: int) -> list[tuple[list[int], int]]:
    """Filler tokens with one marker token (10, 11 or 12) somewhere: the marker is the class."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(3)
        row = [rng.randrange(20, 60) for _ in range(rng.randint(4, 8))]
        row.insert(rng.randrange(len(row) + 1), 10 + label)
        rows.append((row, label))
    return rows


def classifiers() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    decoder = Transformer(load_model_config({"preset": "tiny", "vocab_size": 64, "n_layer": 2, "d_model": 32,
                                             "n_head": 2, "n_kv_head": 1}))
    encoder = EncoderForSequenceClassification(EncoderConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32,
                                                             max_seq_len=32, dropout=0.0, num_labels=3))
    t5 = T5(T5Config(vocab_size=64, d_model=32, head_dim=16, n_head=2, d_ff=64, n_layer=1, dropout=0.0,
                     eos_token_id=1, pad_token_id=0))
    return {"decoder": DecoderClassifier(decoder, 3, eos=1, max_len=16),
            "encoder": EncoderClassifier(encoder, {"cls": 2, "sep": 3, "pad": 0}, max_len=16),
            "t5": TextToTextClassifier(t5, [[5], [6, 7], [8]], max_len=16)}


@pytest.mark.parametrize("kind", ["decoder", "encoder", "t5"])
def test_classifiers_learn_a_separable_task(kind: str) -> None:
    model = classifiers()[kind]
    assert accuracy(model, separable(90, 1)) < 0.7  # untrained: no better than guessing, roughly
    # As many fresh examples as the steps draw: the rule must be learned, not the examples memorised.
    finetune(model, separable(3200, 0), FinetuneConfig(steps=200, batch_size=16, lr=3e-3), seed=0)
    assert accuracy(model, separable(90, 1)) >= 0.9


def test_text_to_text_scores_are_class_name_likelihoods() -> None:
    """Each score is the summed log-probability of the class name and EOS, computed here one class at a time."""
    model = classifiers()["t5"].eval()
    rows = [row for row, _ in separable(3, 2)]
    batch = model.collate(rows)
    with torch.no_grad():
        scores = model(batch)
        for c, name in enumerate([[5, 1], [6, 7, 1], [8, 1]]):
            for b, row in enumerate(rows):
                inputs = torch.tensor([[*row, 1]])
                decoder_inputs = torch.tensor([[0, *name[:-1]]])
                logprobs = torch.log_softmax(model.model(inputs, torch.ones_like(inputs), decoder_inputs), -1)[0]
                expected = sum(logprobs[i, t] for i, t in enumerate(name))
                assert scores[b, c].item() == pytest.approx(float(expected), abs=1e-4)


def test_the_bert_arm_trains_like_transformers_bert(tmp_path: Path) -> None:
    """The MLM arm's model, objective and batches against transformers' BertForMaskedLM from the same weights on
    the same masked batches: the loss curves agree step by step (so the lab's MLM plateau is BERT's own)."""
    from transformers import BertForMaskedLM

    from omnilm.lab.knowledge.experiment import write_corpus
    from omnilm.lab.objectives import SENTINELS, ObjectivesLabConfig, build_arm, encoder_ids
    from omnilm.model.hf_encoder import save_encoder
    from omnilm.tokenizer.families import ensure_family_tokens, sentinel_ids

    config = ObjectivesLabConfig(**TOY | {"finetune": FinetuneConfig(), "seq_len": 32, "batch_size": 4})
    corpus = write_corpus(config, tmp_path / "data")
    tokenizer = corpus.tokenizer
    ensure_family_tokens(tokenizer, "bert")
    sentinel_ids(tokenizer, SENTINELS)
    encoder_ids(tokenizer)
    arm = build_arm("bert", config, tokenizer, corpus.tokens, 0)
    save_encoder(arm.model, tmp_path / "bert", tokenizer=tokenizer)
    theirs = BertForMaskedLM.from_pretrained(tmp_path / "bert", attn_implementation="eager").train()
    ours = arm.model.train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (ours, theirs)]
    curves: list[tuple[float, float]] = []
    for _ in range(20):
        batch = arm.batches.next_batch()
        losses = (arm.objective(ours, batch)[0],
                  theirs(input_ids=batch["inputs"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss)
        for loss, optimizer in zip(losses, optimizers, strict=True):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curves.append((losses[0].item(), losses[1].item()))
    assert curves[-1][0] < curves[0][0] - 0.5  # it learns
    for ours_loss, theirs_loss in curves:
        assert ours_loss == pytest.approx(theirs_loss, rel=1e-4)
