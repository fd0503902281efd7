"""What ``omnilm scaling fit`` writes and ``omnilm scaling plan`` reads: every fit of a run table in one JSON.

``fit.json`` holds ``approach3`` (the Chinchilla law with a, b, G, its Huber objective and run count),
``bootstrap`` (the resampled laws and 95 % percentile intervals of every constant), ``approach2`` (the IsoFLOP
power law and its per-budget minima, when the runs allow it), ``kaplan`` (L(N) and L(D) power laws) and
``params`` (which parameter count was used as N).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from omnilm.errors import UserError
from omnilm.scaling.fit import (
    bootstrap_chinchilla,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law,
    percentile_interval,
)
from omnilm.scaling.laws import ChinchillaLaw
from omnilm.utils.atomic import write_json_atomic

LAW_FIELDS = ("E", "A", "B", "alpha", "beta")
DERIVED = ("a", "b", "G")


def fit_runs(records: list[dict[str, Any]], params: str = "non_embedding", bootstrap: int = 100,
             seed: int = 0) -> dict[str, Any]:
    """Every fit of the run table: approach 3 with bootstrap intervals, approach 2, Kaplan's two laws."""
    from omnilm.scaling.runs import run_arrays

    cols = run_arrays(records, params)
    point = fit_chinchilla(cols["N"], cols["D"], cols["loss"])
    laws = bootstrap_chinchilla(cols["N"], cols["D"], cols["loss"], samples=bootstrap, seed=seed, point=point)
    intervals = {}
    for key in LAW_FIELDS + DERIVED:
        values = [law.to_dict()[key] for law in laws]
        if values:
            intervals[key] = percentile_interval(values)
    report: dict[str, Any] = {
        "params": params, "n_runs": len(records),
        "approach3": point.law.to_dict() | {"huber_objective": point.objective},
        "bootstrap": {"samples": [[getattr(law, k) for k in LAW_FIELDS] for law in laws], "intervals": intervals},
    }
    try:
        iso = fit_isoflop(cols["N"], cols["loss"], cols["budget"])
        report["approach2"] = {"k": iso.k, "a": iso.a, "b": 1 - iso.a, "minima": [asdict(m) for m in iso.minima]}
    except UserError as err:
        report["approach2"] = {"skipped": str(err)}
    for key, column in (("L_N", "N"), ("L_D", "D")):
        try:
            law = fit_power_law(cols[column], cols["loss"])
            report.setdefault("kaplan", {})[key] = {"x_c": law.x_c, "exponent": law.exponent}
        except UserError as err:
            report.setdefault("kaplan", {})[key] = {"skipped": str(err)}
    return report


def write_fit(report: dict[str, Any], path: str | Path) -> Path:
    write_json_atomic(path, report)
    return Path(path)


def read_fit(path: str | Path) -> tuple[ChinchillaLaw, list[ChinchillaLaw], dict[str, Any]]:
    """The point law, the bootstrap laws and the whole report of a ``fit.json``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"fit file not found: {path}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        law = ChinchillaLaw(**{k: float(report["approach3"][k]) for k in LAW_FIELDS})
        samples = [ChinchillaLaw(*map(float, row)) for row in report.get("bootstrap", {}).get("samples", [])]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a fit written by `omnilm scaling fit` ({err})") from None
    return law, samples, report


def plan_budget(law: ChinchillaLaw, samples: list[ChinchillaLaw], flops: float) -> dict[str, Any]:
    """Compute-optimal N, D and the predicted loss at ``flops``, with bootstrap intervals where available."""
    n, d = law.compute_optimal(flops)
    plan: dict[str, Any] = {"flops": flops, "N_opt": n, "D_opt": d, "tokens_per_param": d / n,
                            "loss": law.loss(n, d)}
    if samples:
        allocations = np.array([s.compute_optimal(flops) for s in samples])
        plan["N_opt_interval"] = percentile_interval(allocations[:, 0])
        plan["D_opt_interval"] = percentile_interval(allocations[:, 1])
    return plan


def plan_tokens(law: ChinchillaLaw, samples: list[ChinchillaLaw], n: float, target: float) -> dict[str, Any]:
    """The inverse question: tokens (and FLOPs) for a model of ``n`` parameters to reach loss ``target``."""
    d = law.tokens_for_loss(n, target)
    plan: dict[str, Any] = {"N": n, "target_loss": target, "D": d, "flops": 6 * n * d}
    reachable = [s.tokens_for_loss(n, target) for s in samples if target > s.E + s.A / n ** s.alpha]
    if reachable:
        plan["D_interval"] = percentile_interval(reachable)
        plan["bootstrap_reachable"] = len(reachable) / len(samples)
    return plan
