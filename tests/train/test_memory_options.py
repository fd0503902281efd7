"""``train.loss_chunk_tokens`` and ``train.activation_checkpointing`` trade compute for memory: pretraining and
SFT stages train to the losses they give without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnilm.config import ConfigError
from omnilm.train.config import TrainConfig
from omnilm.train.stage import StageConfig, run_stage

MODEL = {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 64}
TRAIN = {"max_steps": 6, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "log_every": 1, "progress": False,
         "device": "cpu", "checkpoint_every": 0, "eval_batches": 0}


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def run_both(tmp_path: Path, spec: dict, **train: object) -> tuple[list[float], list[float]]:
    runs = []
    for name, memory in (("plain", {}), ("lean", {"loss_chunk_tokens": 24, "activation_checkpointing": True})):
        stage = StageConfig.from_mapping(spec | {"train": TRAIN | train | memory})
        assert run_stage(stage, tmp_path / name).status == "complete"
        runs.append(losses(tmp_path / name))
    return runs[0], runs[1]


def test_pretrain_stage_losses_unchanged(tmp_path: Path, lm_data: dict[str, Path]) -> None:
    plain, lean = run_both(tmp_path, {"name": "toy", "type": "pretrain", "tokenizer": str(lm_data["tokenizer"]),
                                      "model": MODEL | {"dropout": 0.1}, "data": {"toy": str(lm_data["tokens"])}})
    assert len(plain) == len(lean) == TRAIN["max_steps"]
    assert lean == pytest.approx(plain, rel=1e-5, abs=1e-5)
    assert plain[-1] < plain[0]  # it trains: the comparison is not between two constant curves


def test_sft_stage_losses_unchanged(tmp_path: Path, chat_data: dict[str, Path]) -> None:
    """Padded conversations, loss on the replies only (ignored targets), normalised over the global batch."""
    plain, lean = run_both(tmp_path, {"name": "sft", "type": "sft", "tokenizer": str(chat_data["tokenizer"]),
                                      "model": MODEL | {"max_seq_len": 128},
                                      "data": {"qa": {"path": str(chat_data["qa"])}}}, seq_len=96)
    assert len(plain) == len(lean) == TRAIN["max_steps"]
    assert lean == pytest.approx(plain, rel=1e-5, abs=1e-5)


def test_negative_chunk_is_refused() -> None:
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        TrainConfig(max_steps=1, loss_chunk_tokens=-1)
