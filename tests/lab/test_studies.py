"""Every study end to end from the CLI on a tiny run: it finishes, writes its plots, results and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from omnilm.cli import main

TINY: dict[str, Any] = {"people": 6, "bios_per_person": 6, "vocab_size": 400, "steps": 12, "batch_size": 4,
                        "seq_len": 32, "eval_every": 4, "eval_examples": 24, "seeds": 2,
                        "model": {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "max_seq_len": 64}}
EXTRA: dict[str, dict[str, Any]] = {
    "dynamics": {},
    "plateau-scaling": {"people_values": [4, 8], "steps_per_person": 1.0, "min_steps": 8, "evals_per_run": 2},
    "imbalance": {"alphas": [0.0, 1.0], "warmup_people": 2, "warmup_epochs": 1.0, "seeds": 1},
    "forgetting": {"new_people": 4, "finetune_steps": 8, "finetune_eval_every": 4},
    "hallucination": {"unseen_people": 4, "seeds": 1},
    "attention-patching": {"seeds": 1},
}
PLOTS = {"dynamics": ["dynamics.png", "dynamics_attributes.png"], "plateau-scaling": ["plateau_scaling.png"],
         "imbalance": ["imbalance.png", "imbalance_curves.png"],
         "forgetting": ["forgetting_A.png", "forgetting_B.png"], "hallucination": ["hallucination.png"],
         "attention-patching": ["patching.png"]}


def run_study(tmp_path: Path, study: str) -> tuple[dict[str, Any], str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(TINY | EXTRA[study]))
    out = tmp_path / "out"
    assert main(["lab", "knowledge", "--study", study, "--config", str(path), "--out", str(out)]) == 0
    for plot in PLOTS[study]:
        assert (out / plot).stat().st_size > 1000, plot
    report = (out / "report.md").read_text()
    assert "Wall time:" in report and "|---:|" in report
    return json.loads((out / "results.json").read_text()), report


def test_dynamics(tmp_path: Path) -> None:
    results, report = run_study(tmp_path, "dynamics")
    assert len(results["curves"]) == 2 and len(results["phases"]) == 2
    for curve in results["curves"]:
        assert [r["step"] for r in curve] == [4, 8, 12]
        for row in curve:
            assert 0 <= row["accuracy"] <= 1 and row["loss"] > 0 and row["examples"] == 24
            assert row["train_templates/examples"] == 24 and "birth_city/loss" in row
    assert set(results["baseline_per_attribute"]) == {
        "birth_date", "birth_city", "university", "major", "employer", "employer_city"}
    assert "No-knowledge baseline" in report and "Three-phase curve" in report


def test_plateau_scaling(tmp_path: Path) -> None:
    results, report = run_study(tmp_path, "plateau-scaling")
    assert [r["people"] for r in results["runs"]] == [4, 8]
    assert [r["steps"] for r in results["runs"]] == [8, 8]
    assert all(len(r["curves"]) == 2 for r in results["runs"])
    assert "0.81" in report


def test_imbalance(tmp_path: Path) -> None:
    results, report = run_study(tmp_path, "imbalance")
    assert set(results["final"]) == {"alpha=0", "alpha=1", "curriculum"}
    assert "Best α" in report and "curriculum" in report


def test_forgetting(tmp_path: Path) -> None:
    results, report = run_study(tmp_path, "forgetting")
    runs = results["finetuning"]
    assert len(runs) == 2
    for curves in runs.values():
        assert len(curves) == 2
        assert [r["step"] for r in curves[0]] == [0, 4, 8]
        assert all("new/loss" in r for r in curves[0])
    # Both fine-tuning runs start from the same pre-trained model.
    starts = [curves[0][0]["loss"] for curves in runs.values()]
    assert starts[0] == pytest.approx(starts[1])
    assert "replay" in report


def test_hallucination(tmp_path: Path) -> None:
    results, report = run_study(tmp_path, "hallucination")
    summary = results["summary"][0]
    assert summary["seen"]["probes"] == 24 and summary["unseen"]["probes"] == 24
    for row in results["probes"][0]["unseen"]:
        assert 0 < row["confidence"] <= 1 and 0 < row["first_max_prob"] <= 1 and row["first_entropy"] >= 0
    assert "unseen" in report


def test_attention_patching(tmp_path: Path) -> None:
    results, report = run_study(tmp_path, "attention-patching")
    assert len(results["curves"]) == 4  # the reference and three patched runs
    assert all(len(c[0]) == 3 for c in results["curves"].values())
    assert "Post-plateau patterns" in report


def test_unknown_scale_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["lab", "knowledge", "--study", "dynamics", "--scale", "huge", "--out", str(tmp_path)])


def test_report_only_redraws_from_results(tmp_path: Path) -> None:
    results, report = run_study(tmp_path, "dynamics")
    out = tmp_path / "out"
    (out / "report.md").unlink()
    (out / "dynamics.png").unlink()
    assert main(["lab", "knowledge", "--study", "dynamics", "--out", str(out), "--report-only"]) == 0
    assert (out / "report.md").read_text() == report
    assert (out / "dynamics.png").stat().st_size > 1000
