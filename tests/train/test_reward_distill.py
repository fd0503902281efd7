"""Reward-model and distillation stages: held-out pairs, checkpoints of the head, short real runs, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnilm.config import ConfigError
from omnilm.data.chat_data import load_preference_examples
from omnilm.model.config import load_model_config
from omnilm.model.hf import read_hf_tensors, save_pretrained
from omnilm.model.reward import RewardModel, is_reward_folder
from omnilm.model.transformer import Transformer
from omnilm.tokenizer import Tokenizer
from omnilm.train.checkpoint import restore_checkpoint, save_checkpoint
from omnilm.train.config import TrainConfig
from omnilm.train.distributed import Dist
from omnilm.train.optim import build_optimizer
from omnilm.train.reward import evaluate_pairs, split_pairs
from omnilm.train.stage import StageConfig, run_stage

TINY = {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 128}
TRAIN = {"batch_size": 16, "seq_len": 96, "log_every": 1, "progress": False, "device": "cpu", "checkpoint_every": 0}
REFUSALS = ["I do not know.", "No idea, sorry.", "I cannot answer that."]


def tiny_lm(tokenizer: Tokenizer, seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(load_model_config(TINY | {"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id,
                                                 "pad_token_id": tokenizer.pad_id} | overrides))


@pytest.fixture(scope="module")
def refusal_prefs(chat_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The biography preference prompts with the true answer chosen over a refusal: a preference a tiny model can
    learn from a few pairs and apply to held-out prompts (picking the true value among wrong ones cannot
    generalise to unseen facts)."""
    records = [json.loads(line) for line in chat_data["prefs"].read_text().splitlines()]
    path = tmp_path_factory.mktemp("prefs") / "refusals.jsonl"
    path.write_text("".join(json.dumps(r | {"rejected": REFUSALS[i % len(REFUSALS)]}) + "\n"
                            for i, r in enumerate(records)))
    return path


@pytest.fixture(scope="module")
def chat_lm(chat_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny causal LM saved with the chat tokenizer."""
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    return save_pretrained(tiny_lm(tokenizer), tmp_path_factory.mktemp("lm") / "model", tokenizer=tokenizer)


def metric_rows(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def test_held_out_pairs_are_deterministic_and_disjoint(chat_data: dict[str, Path]) -> None:
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    pairs = load_preference_examples([str(chat_data["prefs"])], tokenizer, 128)
    train, held = split_pairs(pairs, 0.25)
    assert len(held) == round(0.25 * len(pairs)) and len(train) + len(held) == len(pairs)
    assert {p.chosen.where for p in train}.isdisjoint(p.chosen.where for p in held)
    # The split follows the records, not their order.
    assert [p.chosen.where for p in split_pairs(pairs[::-1], 0.25)[1]] == [p.chosen.where for p in held][::-1]
    assert split_pairs(pairs, 0.0) == (pairs, [])
    with pytest.raises(ConfigError, match="val_fraction"):
        split_pairs(pairs, 1.0)


def test_checkpoint_restores_the_reward_head(chat_data: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    config = TrainConfig(max_steps=1)
    model = RewardModel(tiny_lm(tokenizer, seed=1))
    path = save_checkpoint(tmp_path, 3, model, build_optimizer(model, config), {"note": 1}, Dist(), tokenizer)
    assert is_reward_folder(path) and "score.weight" in read_hf_tensors(path)
    other = RewardModel(tiny_lm(tokenizer, seed=2))
    state = restore_checkpoint(path, other, build_optimizer(other, config))
    assert state["note"] == 1
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_reward_stage_learns_a_preference_that_holds_on_held_out_pairs(
        chat_data: dict[str, Path], refusal_prefs: Path, chat_lm: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(chat_data["tokenizer"])
    _, held = split_pairs(load_preference_examples([str(refusal_prefs)], tokenizer, TRAIN["seq_len"] + 1), 0.25)
    torch.manual_seed(0)
    before = evaluate_pairs(RewardModel.from_pretrained(chat_lm), held, tokenizer.pad_id, 16)
    config = StageConfig.from_mapping({
        "name": "rm", "type": "reward", "init_from": str(chat_lm), "options": {"val_fraction": 0.25},
        "data": {"prefs": str(refusal_prefs)}, "train": TRAIN | {"max_steps": 15, "lr": 1e-3, "warmup_steps": 3}})
    result = run_stage(config, tmp_path / "rm")
    after = result.last_metrics
    assert after["val_accuracy"] >= 0.75 and after["val_accuracy"] > before["val_accuracy"]
    assert after["val_loss"] < 0.5 * before["val_loss"]
    train_accuracy = metric_rows(tmp_path / "rm", "accuracy")
    assert len(train_accuracy) == 15 and sum(train_accuracy[-5:]) / 5 > 0.9
    # The final folder is the trained reward model: it reproduces the logged evaluation.
    final = RewardModel.from_pretrained(result.final_dir)
    assert evaluate_pairs(final, held, tokenizer.pad_id, 16)["val_accuracy"] == pytest.approx(after["val_accuracy"])


@pytest.mark.slow
def test_reward_stage_resumes_with_its_head(chat_data: dict[str, Path], refusal_prefs: Path, chat_lm: Path,
                                            tmp_path: Path) -> None:
    def stage(steps: int) -> StageConfig:
        return StageConfig.from_mapping({
            "name": "rm", "type": "reward", "init_from": str(chat_lm), "data": {"prefs": str(refusal_prefs)},
            "train": TRAIN | {"max_steps": steps, "lr": 1e-3, "schedule": "constant", "checkpoint_every": 3,
                              "batch_size": 4}})

    run_stage(stage(6), tmp_path / "full")
    run_stage(stage(3), tmp_path / "split")
    result = run_stage(stage(6), tmp_path / "split", resume=True, force=True)  # a budget extension
    assert result.step == 6
    full, resumed = read_hf_tensors(tmp_path / "full" / "final"), read_hf_tensors(tmp_path / "split" / "final")
    assert full.keys() == resumed.keys() and "score.weight" in full
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def with_tokenizer(config: StageConfig, tokenizer: Path) -> StageConfig:
    config.tokenizer = str(tokenizer)
    return config


def distill_config(teacher: Path | None, data: dict[str, object], **options: object) -> StageConfig:
    return StageConfig.from_mapping({
        "name": "kd", "type": "distill", "model": TINY | {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1},
        "data": data, "options": ({"teacher": str(teacher)} if teacher else {}) | options,
        "train": TRAIN | {"max_steps": 30, "lr": 3e-3, "warmup_steps": 3, "batch_size": 8, "seq_len": 32}})


@pytest.mark.slow
def test_distilled_student_moves_towards_its_teacher(lm_data: dict[str, Path], tmp_path: Path) -> None:
    teacher = StageConfig.from_mapping({
        "name": "teacher", "type": "pretrain", "tokenizer": str(lm_data["tokenizer"]), "model": TINY,
        "data": {"toy": str(lm_data["tokens"])},
        "train": TRAIN | {"max_steps": 30, "lr": 3e-3, "warmup_steps": 3, "batch_size": 8, "seq_len": 32}})
    teacher_dir = run_stage(teacher, tmp_path / "teacher").final_dir
    # The student is smaller and takes its tokenizer from the teacher's folder.
    result = run_stage(distill_config(teacher_dir, {"toy": str(lm_data["tokens"])}, temperature=2.0, alpha=0.5),
                       tmp_path / "kd")
    kl, ce = metric_rows(tmp_path / "kd", "kl"), metric_rows(tmp_path / "kd", "ce")
    assert len(kl) == len(ce) == 30
    assert sum(kl[-5:]) / 5 < 0.5 * sum(kl[:5]) / 5
    assert sum(ce[-5:]) < sum(ce[:5])
    student = read_hf_tensors(result.final_dir)
    assert student["model.embed_tokens.weight"].shape[1] == 32


def test_distillation_on_chat_replies(chat_data: dict[str, Path], chat_lm: Path, tmp_path: Path) -> None:
    config = distill_config(chat_lm, {"qa": str(chat_data["qa"])}, data_format="chat", alpha=1.0)
    config.train.max_steps, config.train.seq_len = 12, 96
    run_stage(config, tmp_path / "kd")
    kl = metric_rows(tmp_path / "kd", "kl")
    assert sum(kl[-3:]) < 0.7 * sum(kl[:3])


def test_distill_config_errors(lm_data: dict[str, Path], chat_data: dict[str, Path], chat_lm: Path,
                               tmp_path: Path) -> None:
    data = {"toy": str(lm_data["tokens"])}
    with pytest.raises(ConfigError, match="options.teacher"):
        run_stage(distill_config(None, data), tmp_path / "a")
    with pytest.raises(ConfigError, match="not found"):
        run_stage(distill_config(tmp_path / "missing", data), tmp_path / "b")
    with pytest.raises(ConfigError, match="data_format"):
        run_stage(distill_config(chat_lm, data, data_format="parquet"), tmp_path / "c")
    # A teacher trained with another tokenizer: different vocabulary sizes.
    with pytest.raises(ConfigError, match="vocabulary has 400 tokens, the student's 300"):
        run_stage(with_tokenizer(distill_config(chat_lm, data), lm_data["tokenizer"]), tmp_path / "d")
    # Same size, different tokens.
    same_size = save_pretrained(tiny_lm(Tokenizer.from_dir(lm_data["tokenizer"])), tmp_path / "same-size",
                                tokenizer=Tokenizer.from_dir(chat_data["tokenizer"]))
    with pytest.raises(ConfigError, match="tokenizer .* differs"):
        run_stage(with_tokenizer(distill_config(same_size, data), lm_data["tokenizer"]), tmp_path / "e")
