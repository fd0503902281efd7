"""IsoFLOP sweeps: several model sizes at each of several compute budgets, from one pre-training stage template.

A size spec ``WIDTHxLAYERS`` (e.g. ``64x2``) replaces the template model's ``d_model`` and ``n_layer``; heads
are ``WIDTH // head_width`` (plain multi-head attention). For a budget C the run trains on D = C/(6·N) tokens
(N = non-embedding parameters, Kaplan's convention), rounded to whole steps of the template's batch. Each run is
an ordinary resumable stage in ``OUT/runs/<name>``; its record is appended to ``OUT/runs.jsonl`` when it ends,
and a run already in the table is skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.errors import UserError
from omnilm.scaling.runs import RUNS_FILE, append_run, read_runs

SIZE_SPEC = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class PlannedRun:
    """One cell of the grid: the stage config to run and what it will be recorded as."""

    name: str
    size: str
    budget: float
    n_params: int
    n_params_total: int
    steps: int
    tokens: int
    stage: dict[str, Any]


def parse_size(spec: str) -> tuple[int, int]:
    match = SIZE_SPEC.match(spec.strip())
    if not match:
        raise UserError(f"size {spec!r}: expected WIDTHxLAYERS, e.g. 64x2")
    return int(match.group(1)), int(match.group(2))


def count_params(model_values: dict[str, Any], vocab_size: int) -> tuple[int, int]:
    """(non-embedding, total) parameter counts of a model config mapping, built on the meta device."""
    import torch

    from omnilm.model.config import load_model_config
    from omnilm.model.transformer import Transformer

    config = load_model_config(dict(model_values) | {"vocab_size": vocab_size})
    with torch.device("meta"):
        model = Transformer(config)
    return model.num_params(include_embeddings=False), model.num_params()


def plan_sweep(template: dict[str, Any], sizes: list[str], budgets: list[float], vocab_size: int,
               head_width: int = 32, min_steps: int = 10) -> tuple[list[PlannedRun], list[str]]:
    """The runs of the grid and notes on the cells left out (too few steps for their budget)."""
    train = template.get("train") or {}
    tokens_per_step = int(train.get("batch_size", 16)) * int(train.get("seq_len", 256))
    runs, notes = [], []
    for budget in budgets:
        for size in sizes:
            width, layers = parse_size(size)
            if width % head_width:
                raise UserError(f"size {size}: width must be a multiple of the head width {head_width}")
            model = dict(template.get("model") or {"preset": "tiny"})
            model |= {"d_model": width, "n_layer": layers, "n_head": width // head_width, "n_kv_head": None,
                      "d_ff": None, "head_dim": None}
            n, total = count_params(model, vocab_size)
            steps = round(budget / (6 * n) / tokens_per_step)
            if steps < min_steps:
                notes.append(f"{size} at {budget:.3g} FLOPs: {steps} steps (< {min_steps}), left out")
                continue
            stage = copy.deepcopy(template)
            stage["model"] = model
            stage["train"] = {k: v for k, v in train.items() if k != "max_tokens"} | {"max_steps": steps}
            stage.pop("init_from", None)
            runs.append(PlannedRun(f"{size}_c{budget:.2e}", size, budget, n, total, steps,
                                   steps * tokens_per_step, stage))
    return runs, notes


def execute_run(run: PlannedRun, out_dir: str, threads: int) -> dict[str, Any]:
    """Train one run (resuming its checkpoints) and return its table record."""
    import torch

    from omnilm.train.stage import StageConfig, run_stage

    if threads:
        torch.set_num_threads(threads)
    config = StageConfig.from_mapping(run.stage, source=run.name)
    start = time.perf_counter()
    result = run_stage(config, Path(out_dir) / "runs" / run.name, resume=True)
    if result.status != "complete":
        raise UserError(f"run {run.name} was interrupted at step {result.step}; rerun the sweep to continue")
    if "val_loss" not in result.last_metrics:
        raise UserError(f"run {run.name}: no validation loss (the data need a val split and train.eval_batches > 0)")
    return {"name": run.name, "size": run.size, "budget": run.budget, "n_params": run.n_params,
            "n_params_total": run.n_params_total, "tokens": run.tokens, "flops": 6.0 * run.n_params * run.tokens,
            "val_loss": float(result.last_metrics["val_loss"]), "steps": run.steps,
            "wall_s": round(time.perf_counter() - start, 2)}


def run_sweep(runs: list[PlannedRun], out_dir: str | Path, jobs: int = 1) -> list[dict[str, Any]]:
    """Train every run not yet in ``out_dir/runs.jsonl`` (``jobs`` at a time, each in its own process when
    jobs > 1, sharing the CPU threads); return the records written now."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / RUNS_FILE
    done = {r["name"] for r in read_runs(table)} if table.is_file() else set()
    todo = [run for run in runs if run.name not in done]
    written = []
    if jobs <= 1:
        for run in todo:
            record = execute_run(run, str(out_dir), 0)
            append_run(table, record)
            written.append(record)
        return written
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(execute_run, run, str(out_dir), threads) for run in todo]
        errors = []
        # Each run is recorded as soon as it ends, so one failure does not lose the others' results.
        for future in as_completed(futures):
            try:
                record = future.result()
            except Exception as err:  # noqa: BLE001 - reported together below
                errors.append(str(err))
                continue
            append_run(table, record)
            written.append(record)
    if errors:
        raise UserError(f"{len(errors)} run(s) failed: " + "; ".join(errors))
    return written


def budgets_from_text(values: list[str]) -> list[float]:
    out = []
    for value in values:
        try:
            budget = float(value)
        except ValueError:
            raise UserError(f"budget {value!r} is not a number of FLOPs (e.g. 3e13)") from None
        if not math.isfinite(budget) or budget <= 0:
            raise UserError(f"budget {value!r} must be positive")
        out.append(budget)
    return out
