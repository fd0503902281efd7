"""The MoE lab end to end at toy size: four runs at equal active compute, curves against FLOPs, expert loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnilm.cli import main


def test_moe_lab_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = {"people": 8, "bios_per_person": 5, "vocab_size": 400, "batch_size": 2, "seq_len": 16,
              "eval_examples": 20, "steps": 8, "eval_every": 2, "experts": 4, "top_k": 2, "granularity": 2,
              "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "n_kv_head": 1}}
    (tmp_path / "lab.json").write_text(json.dumps(config))
    assert main(["lab", "moe", "--config", str(tmp_path / "lab.json"), "--out", str(tmp_path / "out")]) == 0
    report = capsys.readouterr().out
    assert "| upcycled |" in report and "Wall time" in report
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["dense", "moe", "dense-continued", "upcycled"]
    # Equal active compute: the MoE runs' active parameters are the dense model's plus the routers.
    dense = runs["dense"]["active_params"]
    for name in ("moe", "upcycled"):
        assert 0 < runs[name]["active_params"] - dense <= 2 * 4 * 32 and runs[name]["params"] > runs["dense"]["params"]
        assert len(runs[name]["load"]) == 2 and all(sum(layer) == pytest.approx(1.0) for layer in runs[name]["load"])
    # The continued runs share the first half, then go on to the full number of steps.
    assert runs["upcycled"]["curve"][:2] == runs["dense-continued"]["curve"][:2]
    assert [r["step"] for r in runs["upcycled"]["curve"]] == [2, 4, 6, 8]
    for name in ("moe.png", "moe_load.png", "report.md"):
        assert (tmp_path / "out" / name).is_file()
    assert main(["lab", "moe", "--out", str(tmp_path / "out"), "--report-only"]) == 0
