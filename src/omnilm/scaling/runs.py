"""The run table of a scaling sweep: one JSON object per finished run in ``runs.jsonl``, appended as runs end.

Fields of a record: ``name`` (the run folder), ``size`` (the size spec), ``budget`` (the requested FLOPs),
``n_params`` (non-embedding parameters), ``n_params_total``, ``tokens`` (D, tokens trained on), ``flops``
(6·N·D with the non-embedding N), ``val_loss`` (final validation loss, nats/token), ``steps``, ``wall_s``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from omnilm.errors import UserError

RUNS_FILE = "runs.jsonl"
REQUIRED = ("n_params", "n_params_total", "tokens", "flops", "val_loss")
#: Which parameter count a fit uses as N: Kaplan's non-embedding count or Chinchilla's total.
PARAM_COLUMNS = {"non_embedding": "n_params", "total": "n_params_total"}


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run table (a ``runs.jsonl`` file, or a sweep folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RUNS_FILE
    if not path.is_file():
        raise UserError(f"run table not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not a JSON object ({err})") from None
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise UserError(f"{path}:{number}: run record lacks {missing}")
        records.append(record)
    return records


def append_run(path: str | Path, record: dict[str, Any]) -> None:
    """Append one finished run (a single write of one line, so a crash never leaves half a record)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def run_arrays(records: list[dict[str, Any]], params: str = "non_embedding") -> dict[str, np.ndarray]:
    """Columns N, D, C (the FLOPs with that N), the budget label and the loss as float arrays."""
    if params not in PARAM_COLUMNS:
        raise UserError(f"unknown parameter count {params!r}; expected one of {sorted(PARAM_COLUMNS)}")
    n = np.array([r[PARAM_COLUMNS[params]] for r in records], dtype=np.float64)
    d = np.array([r["tokens"] for r in records], dtype=np.float64)
    budget = np.array([r.get("budget", r["flops"]) for r in records], dtype=np.float64)
    return {"N": n, "D": d, "C": 6 * n * d, "budget": budget,
            "loss": np.array([r["val_loss"] for r in records], dtype=np.float64)}
