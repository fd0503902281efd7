"""Recipes end to end: the demo's smoke preset, stage skipping on a re-run, chained stages, retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from omnilm.cli import main
from omnilm.config import ConfigError
from omnilm.recipe.recipe import builtin_recipes, load_recipe


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "demo-smoke"
    assert main(["run", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_demo_smoke_produces_a_model_report_and_evals(smoke_run: Path) -> None:
    from transformers import AutoModelForCausalLM

    from omnilm.model.hf import load_pretrained

    report = (smoke_run / "report.md").read_text()
    for expected in ("## Stage `pretrain` (pretrain)", "![pretrain loss curve](pretrain/loss.png)", "completion",
                     "## Retention"):
        assert expected in report
    assert (smoke_run / "pretrain" / "loss.png").stat().st_size > 1000
    evals = json.loads((smoke_run / "evals.json").read_text())["pretrain"]
    assert 0 <= evals["completion"]["accuracy"] <= 1 and evals["completion"]["examples"] == 24 * 6
    assert evals["pretrain_val"]["val_loss"] < 6.2  # below uniform over 512 tokens: it learned something
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    ours = load_pretrained(smoke_run / "final", dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(smoke_run / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_rerun_skips_finished_work(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (smoke_run / "final" / "model.safetensors").read_bytes()
    assert main(["run", "--preset", "smoke", "--out", str(smoke_run)]) == 0
    out = capsys.readouterr().out
    assert "[bios] synth_bios: already done, skipped" in out
    assert "[pretrain] already complete (40 steps), skipped" in out
    assert (smoke_run / "final" / "model.safetensors").read_bytes() == before


def test_chained_stages_continue_from_the_previous_model(smoke_run: Path, tmp_path: Path) -> None:
    recipe = {
        "name": "chain",
        "stages": {
            "first": {"type": "pretrain", "tokenizer": str(smoke_run / "tokenizer"),
                      "model": {"preset": "tiny", "d_model": 64, "n_layer": 2, "max_seq_len": 64},
                      "data": {"bios": str(smoke_run / "tokens")},
                      "train": {"max_steps": 6, "batch_size": 4, "seq_len": 32, "progress": False},
                      "evals": {"val": {"type": "val_loss", "data": str(smoke_run / "tokens"), "seq_len": 32}}},
            "second": {"type": "midtrain", "data": {"bios": str(smoke_run / "tokens")},
                       "train": {"max_steps": 4, "batch_size": 4, "seq_len": 32, "lr": 1e-3, "progress": False}},
        },
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    first_state = json.loads((tmp_path / "run" / "second" / "final" / "config.json").read_text())
    assert first_state["hidden_size"] == 64  # the second stage started from the first stage's model
    retention = (tmp_path / "run" / "retention.md").read_text()
    assert "after first | after second" in retention and "val (val_loss)" in retention


def test_recipe_errors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "demo" in builtin_recipes()
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        load_recipe("demo", preset="huge")
    with pytest.raises(ConfigError, match="no built-in recipe"):
        load_recipe("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "stagez": {}}))
    assert main(["run", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "unknown top-level key(s) ['stagez']" in capsys.readouterr().err
