"""Resuming the encoder and encoder–decoder stages: a run cut after its step-4 checkpoint and resumed ends exactly
as the uninterrupted run (same logged losses, bit-identical weights), as ``pretrain`` does in test_stage.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from omnilm.model.hf import read_hf_tensors
from omnilm.train.stage import StageConfig, run_stage

TRAIN = {"max_steps": 8, "batch_size": 4, "seq_len": 24, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
         "eval_batches": 0, "progress": False, "device": "cpu", "checkpoint_every": 4, "keep_checkpoints": 2}


def labelled(path: Path) -> Path:
    rows = [{"text": f"the {'cat' if i % 2 else 'dog'} sat on the {'red' if i % 3 else 'blue'} mat",
             "label": "cat" if i % 2 else "dog"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def stage_config(kind: str, lm_data: dict[str, Path], root: Path) -> StageConfig:
    tokens, tokenizer = {"toy": str(lm_data["tokens"])}, str(lm_data["tokenizer"])
    small = {"d_model": 32, "max_seq_len": 32}
    common = {"name": kind.replace("+", "-"), "type": kind, "tokenizer": tokenizer, "train": TRAIN}
    specs = {
        "mlm": {"data": tokens, "model": {"preset": "bert-tiny", "n_layer": 1} | small},
        "mlm+nsp": {"type": "mlm", "data": tokens, "model": {"preset": "bert-tiny", "n_layer": 1} | small,
                    "options": {"next_sentence": True}},
        "electra": {"data": tokens, "model": {"preset": "electra-tiny", "n_layer": 1, "embedding_size": 16} | small,
                    "options": {"generator_size_divisor": 2}},
        "span_corruption": {"data": tokens, "model": {"preset": "t5-tiny", "n_layer": 1} | small},
        "denoise": {"data": tokens, "model": {"preset": "bart-tiny"} | small},
        "classify": {"data": {"train": str(labelled(root / "labels.jsonl"))},
                     "model": {"preset": "bert-tiny", "n_layer": 1} | small},
        "seq2seq_sft": {"data": {"train": str(labelled(root / "pairs.jsonl"))},
                        "model": {"preset": "t5-tiny", "n_layer": 1} | small,
                        "options": {"input_field": "text", "output_field": "label"}},
    }
    return StageConfig.from_mapping(common | specs[kind])


def logged(run: Path) -> dict[int, dict[str, float]]:
    """Step -> the logged values that depend on the training itself (not on timing)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows if "loss" in r}


@pytest.mark.parametrize("kind", ["mlm", "mlm+nsp", "electra", "span_corruption", "denoise", "classify", "seq2seq_sft"])
def test_resumed_stage_equals_the_uninterrupted_run(tmp_path: Path, lm_data: dict[str, Path], kind: str) -> None:
    config = stage_config(kind, lm_data, tmp_path)
    full = tmp_path / "full"
    assert run_stage(config, full).status == "complete"
    # The state of a run killed after its step-4 checkpoint: that checkpoint, and a log that runs on past it.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-0000008")
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-0000004"]
    assert run_stage(config, cut, resume=True).status == "complete"
    assert logged(cut) == logged(full) and sorted(logged(full)) == list(range(1, 9))
    folders = [Path()] + ([Path("generator")] if kind == "electra" else [])
    for folder in folders:
        ours, theirs = read_hf_tensors(full / "final" / folder), read_hf_tensors(cut / "final" / folder)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (folder, key)
