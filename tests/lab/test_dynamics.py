"""The dynamics study end to end on a tiny run: files, logged attribute metrics, phases, report."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from omnilm.cli import main


def test_dynamics_study_runs_and_reports(tmp_path: Path) -> None:
    config = {"people": 6, "bios_per_person": 6, "vocab_size": 400, "steps": 20, "batch_size": 4, "seq_len": 32,
              "eval_every": 5, "eval_examples": 24, "seeds": 2,
              "model": {"preset": "tiny", "d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1,
                        "max_seq_len": 64}}
    path = tmp_path / "dynamics.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["lab", "knowledge", "--study", "dynamics", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["curves"]) == 2 and len(results["phases"]) == 2
    for curve in results["curves"]:
        assert [r["step"] for r in curve] == [5, 10, 15, 20]
        assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 and r["examples"] == 24 for r in curve)
    assert results["baseline"] > 0 and set(results["baseline_per_attribute"]) == {
        "birth_date", "birth_city", "university", "major", "employer", "employer_city"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "No-knowledge baseline" in report and "| seed |" in report
    assert (tmp_path / "out" / "dynamics.png").stat().st_size > 1000
