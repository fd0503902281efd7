"""Chat SFT and DPO stages: batching without cross-talk, the masked loss, bad records, short real runs."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import small_model
from omnilm.data.chat_data import load_chat_examples, load_preference_examples
from omnilm.data.examples import ExampleLoader, pad_right
from omnilm.data.sources import ReadReport
from omnilm.errors import UserError
from omnilm.objectives.lm import masked_lm_loss
from omnilm.train.stage import StageConfig, run_stage


def test_padded_rows_do_not_see_each_other_and_the_loss_covers_replies_only(chat_data: dict[str, Path]) -> None:
    from omnilm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    examples = load_chat_examples([str(chat_data["qa"])], tokenizer, max_len=128)[:5]
    model = small_model("llama", vocab_size=tokenizer.vocab_size)
    tokens = pad_right([e.ids for e in examples], tokenizer.pad_id)
    mask = pad_right([e.mask for e in examples], 0)
    assert len({len(e.ids) for e in examples}) > 1  # some rows are padded
    with torch.no_grad():
        batched = model(tokens)
        for row, example in enumerate(examples):  # each row computes exactly what the conversation alone does
            alone = model(torch.tensor([example.ids]))
            torch.testing.assert_close(batched[row, :len(example.ids)], alone[0], atol=1e-5, rtol=0)
        loss, extra = masked_lm_loss(model, {"tokens": tokens, "loss_mask": mask})
    # Independent: explicit loop over the reply tokens of every conversation.
    total, count = 0.0, 0
    for example in examples:
        with torch.no_grad():
            logits = model(torch.tensor([example.ids]))[0].double()
        for t in range(1, len(example.ids)):
            if example.mask[t]:
                total -= float(F.log_softmax(logits[t - 1], -1)[example.ids[t]])
                count += 1
    assert extra["loss_tokens"] == count
    assert math.isclose(float(loss), total / count, rel_tol=1e-5)


def test_bad_records_are_reported_with_file_and_line(chat_data: dict[str, Path], tmp_path: Path) -> None:
    from omnilm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    lines = [good, {"messages": [{"content": "no role"}]}, {"messages": [{"role": "robot", "content": "x"}]},
             {"messages": [{"role": "user", "content": ""}]}, "{not json", {"prompt": "Q", "completion": "A"},
             {"text": "neither"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    report = ReadReport()
    examples = load_chat_examples([str(path)], tokenizer, max_len=64, report=report)
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:6"]
    assert report.malformed == 5
    expected = {2: "missing role", 3: "unknown role 'robot'", 4: "empty content", 5: "invalid JSON",
                7: "neither messages nor prompt/completion"}
    for line, reason in expected.items():
        assert any(p.startswith(f"{path}:{line}: ") and reason in p for p in report.problems), (line, report.problems)
    with pytest.raises(UserError, match=f"{path}:2: .*missing role"):
        load_chat_examples([str(path)], tokenizer, max_len=64, strict=True)
    pairs = load_preference_examples([str(chat_data["prefs"])], tokenizer, max_len=128)
    assert pairs and all(p.chosen.ids != p.rejected.ids for p in pairs)


def test_example_loader_is_resumable_and_splits_ranks() -> None:
    single = ExampleLoader(10, 4, collate=list, seed=3)
    ranks = [ExampleLoader(10, 2, collate=list, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(5):
        batch = single.next_batch()
        assert batch == ranks[0].next_batch() + ranks[1].next_batch()
        seen += batch
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # whole epochs
    resumed = ExampleLoader(10, 4, collate=list, seed=3)
    resumed.load_state_dict(single.state_dict())
    assert resumed.next_batch() == single.next_batch()


def losses(run: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.mark.slow
def test_sft_then_dpo_improve_their_objectives(chat_data: dict[str, Path], tmp_path: Path) -> None:
    train = {"batch_size": 16, "seq_len": 96, "lr": 3e-3, "log_every": 1, "progress": False, "device": "cpu",
             "checkpoint_every": 0}
    sft = StageConfig.from_mapping({
        "name": "sft", "type": "sft", "tokenizer": str(chat_data["tokenizer"]),
        "model": {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 128},
        "data": {"qa": {"path": str(chat_data["qa"]), "where": {"split": "train"}}},
        "train": train | {"max_steps": 60, "warmup_steps": 5}})
    result = run_stage(sft, tmp_path / "sft")
    curve = losses(tmp_path / "sft")
    assert result.status == "complete" and sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5

    dpo = StageConfig.from_mapping({
        "name": "dpo", "type": "dpo", "init_from": str(result.final_dir), "options": {"beta": 0.5},
        "data": {"prefs": {"path": str(chat_data["prefs"]), "where": {"split": "train"}}},
        "train": train | {"max_steps": 25, "lr": 1e-3}})
    run_stage(dpo, tmp_path / "dpo")
    curve, accuracy = losses(tmp_path / "dpo"), losses(tmp_path / "dpo", "rewards/accuracy")
    assert curve[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert sum(curve[-5:]) / 5 < 0.6 * math.log(2)
    assert sum(accuracy[-5:]) / 5 > 0.8


def test_sft_with_replay_of_pretraining_data(chat_data: dict[str, Path], lm_data: dict[str, Path],
                                             tmp_path: Path) -> None:
    from omnilm.config import ConfigError
    from omnilm.data.tokenize import tokenize_corpus

    replay = tmp_path / "replay"
    tokenize_corpus([str(chat_data["root"] / "bios" / "train.jsonl")], chat_data["tokenizer"], replay, workers=1,
                    progress=False)
    spec = {"name": "sft", "type": "sft", "tokenizer": str(chat_data["tokenizer"]),
            "model": {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 128},
            "data": {"qa": {"path": str(chat_data["qa"])}},
            "options": {"replay_data": str(replay), "replay_weight": 0.5, "replay_batch_size": 4},
            "train": {"max_steps": 4, "batch_size": 4, "seq_len": 64, "log_every": 1, "progress": False,
                      "device": "cpu", "checkpoint_every": 2}}
    result = run_stage(StageConfig.from_mapping(spec), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "replay_loss" in r]
    assert result.status == "complete" and len(logged) == 4
    for r in logged:  # the logged loss is the task loss plus the weighted replay loss
        assert r["loss"] == pytest.approx(r["task_loss"] + 0.5 * r["replay_loss"], rel=1e-5)
    # Rows of similar length in separate forward passes: the same training, up to float summation order.
    spec["options"]["length_groups"] = 3
    run_stage(StageConfig.from_mapping(spec), tmp_path / "grouped")
    grouped = [json.loads(line) for line in (tmp_path / "grouped" / "metrics.jsonl").read_text().splitlines()]
    grouped = [r for r in grouped if "replay_loss" in r]
    assert [r["loss"] for r in grouped] == pytest.approx([r["loss"] for r in logged], rel=1e-4)
    spec["options"]["length_groups"] = 0
    with pytest.raises(ConfigError, match="length_groups"):
        run_stage(StageConfig.from_mapping(spec), tmp_path / "no_groups")
    spec["options"]["length_groups"] = 1
    spec["options"]["replay_data"] = str(lm_data["tokens"])  # tokenised with another vocabulary
    with pytest.raises(ConfigError, match="vocabulary"):
        run_stage(StageConfig.from_mapping(spec), tmp_path / "bad")


@settings(max_examples=200, deadline=None)
@given(count=st.integers(0, 40), weight=st.floats(0, 4.5, allow_nan=False), seed=st.integers(0, 3))
def test_sft_source_weight_repeats_every_record_evenly(count: int, weight: float, seed: int) -> None:
    import random

    from omnilm.train.sft import weighted

    records = [f"r{i}" for i in range(count)]
    once = weighted(records, weight, random.Random(seed), "stage.qa")
    assert once == weighted(records, weight, random.Random(seed), "stage.qa")  # a fixed share, not a fresh draw
    seen = Counter(once)
    assert len(once) == int(weight) * count + round((weight - int(weight)) * count)
    assert all(seen[r] in (int(weight), int(weight) + 1) for r in records) and set(seen) <= set(records)


def test_sft_source_weight_must_not_be_negative() -> None:
    import random

    from omnilm.config import ConfigError
    from omnilm.train.sft import weighted

    with pytest.raises(ConfigError, match="stage.qa: weight"):
        weighted(["a"], -1.0, random.Random(0), "stage.qa")
