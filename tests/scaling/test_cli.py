"""``omnilm scaling fit`` and ``plan`` end to end on a run table written like a sweep's."""

import json

import numpy as np
import pytest

from omnilm.cli import main
from omnilm.scaling.laws import ChinchillaLaw
from omnilm.scaling.runs import append_run


def write_table(path, law):
    rng = np.random.default_rng(0)
    for budget in np.logspace(17, 20, 4):
        n_opt, _ = law.compute_optimal(budget)
        for factor in np.logspace(-0.8, 0.8, 5):
            n = n_opt * factor
            d = budget / (6 * n)
            append_run(path, {"name": f"{n:.3g}_{budget:.2e}", "budget": budget, "n_params": n,
                              "n_params_total": 2 * n, "tokens": d, "flops": 6 * n * d,
                              "val_loss": law.loss(n, d) * float(np.exp(rng.normal(0, 0.002)))})


def test_fit_then_plan(tmp_path, capsys):
    write_table(tmp_path / "runs.jsonl", ChinchillaLaw())
    assert main(["scaling", "fit", "--runs", str(tmp_path), "--bootstrap", "20"]) == 0
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["approach3"]["alpha"] == pytest.approx(0.34, abs=0.03)
    assert report["approach2"]["a"] == pytest.approx(ChinchillaLaw().a, abs=0.03)
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["scaling", "plan", "--fit", str(tmp_path / "fit.json"), "--flops", "1e21", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    low, high = plan["N_opt_interval"]
    assert low <= plan["N_opt"] <= high
    assert plan["N_opt"] == pytest.approx(ChinchillaLaw().compute_optimal(1e21)[0], rel=0.3)
    assert main(["scaling", "plan", "--params", "1e9", "--target-loss", "2.2", "--json"]) == 0
    inverse = json.loads(capsys.readouterr().out)
    assert ChinchillaLaw().loss(1e9, inverse["D"]) == pytest.approx(2.2)


def test_plan_errors_are_user_errors(tmp_path, capsys):
    assert main(["scaling", "plan", "--params", "1e6", "--target-loss", "1.0"]) == 2
    assert "never reaches" in capsys.readouterr().err
    assert main(["scaling", "plan", "--gpu-hours", "10", "--gpu", "abacus"]) == 2
    assert main(["scaling", "fit", "--runs", str(tmp_path / "missing.jsonl")]) == 2
