"""Running a recipe: preparation jobs, then stages in order, evaluations and the retention table after each.

Everything is resumable: a job or stage that finished is skipped (its marker file exists), an unfinished stage
continues from its latest checkpoint. After each stage, the evaluations declared by that stage and by every
earlier stage run on its final model, so the retention table shows what each stage kept of earlier skills.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from omnilm.recipe.jobs import run_job
from omnilm.recipe.recipe import Recipe
from omnilm.utils.atomic import write_json_atomic, write_text_atomic

STAGE_DONE = "stage.json"
PATH_KEYS = ("init_from", "tokenizer")
OPTION_PATH_KEYS = ("teacher", "reward_model", "replay_data")  # stage options that name model folders


def _resolve(path: str, root: Path) -> str:
    return str(path if Path(path).is_absolute() else root / path)


def resolve_stage(spec: dict[str, Any], root: Path, previous_final: Path | None) -> dict[str, Any]:
    """Stage mapping with relative paths made absolute; ``init_from`` defaults to the previous stage's model."""
    spec = dict(spec)
    if previous_final is not None and not spec.get("init_from") and not spec.get("model"):
        spec["init_from"] = str(previous_final)
    for key in PATH_KEYS:
        if spec.get(key):
            spec[key] = _resolve(spec[key], root)
    options = dict(spec.get("options") or {})
    for key in OPTION_PATH_KEYS:
        if options.get(key):
            options[key] = _resolve(options[key], root)
    if options:
        spec["options"] = options
    data = {}
    for name, source in (spec.get("data") or {}).items():
        source = {"path": source} if isinstance(source, str) else dict(source)
        source["path"] = _resolve(source["path"], root)
        data[name] = source
    spec["data"] = data
    return spec


def resolve_evals(evals: dict[str, dict[str, Any]], root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec in (evals or {}).items():
        spec = dict(spec)
        for key in ("data", "seen"):
            if spec.get(key):
                spec[key] = _resolve(spec[key], root)
        out[name] = spec
    return out


def retention_table(results: dict[str, dict[str, dict[str, float]]], evals: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per evaluation (its headline metric), one column per stage it was measured after."""
    from omnilm.eval.suite import HEADLINE

    stages = list(results)
    lines = ["| eval (metric) | " + " | ".join(f"after {s}" for s in stages) + " |",
             "|---|" + "---:|" * len(stages)]
    for name, spec in evals.items():
        metric = HEADLINE.get(spec.get("type", ""), "")
        cells = []
        for stage in stages:
            value = results[stage].get(name, {}).get(metric)
            cells.append("" if value is None else f"{value:.4f}")
        lines.append(f"| {name} ({metric}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_recipe(recipe: Recipe, out_dir: str | Path, log: Any = print) -> dict[str, Any]:
    """Run ``recipe`` into ``out_dir``; returns a summary (also written to ``summary.json``)."""
    from omnilm.eval.suite import run_evals
    from omnilm.train.stage import StageConfig, run_stage

    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {"recipe": recipe.name, "source": recipe.source, "jobs": {}, "stages": {}}
    for name, job in recipe.prepare.items():
        summary["jobs"][name] = run_job(name, job, root, log)

    previous_final: Path | None = None
    all_evals: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, raw in recipe.stages.items():
        raw = dict(raw)
        all_evals |= resolve_evals(raw.pop("evals", {}), root)
        spec = resolve_stage(raw, root, previous_final) | {"name": name}
        stage_dir = root / name
        marker = stage_dir / STAGE_DONE
        if marker.is_file():
            record = json.loads(marker.read_text(encoding="utf-8"))
            log(f"[{name}] already complete ({record['steps']} steps), skipped")
        else:
            config = StageConfig.from_mapping(spec, source=f"{recipe.source}: stage {name}")
            log(f"[{name}] {config.type}: training into {stage_dir}")
            began = time.perf_counter()
            result = run_stage(config, stage_dir, resume=True)
            if result.status != "complete":
                summary["interrupted"] = name
                return summary
            # Relative to the run folder, so a run folder can be moved and still resumed.
            record = {"type": config.type, "steps": result.step, "seconds": time.perf_counter() - began,
                      "final": str(Path(result.final_dir).resolve().relative_to(root)),
                      "last_metrics": result.last_metrics}
            write_json_atomic(marker, record)
        previous_final = root / record["final"]
        log(f"[{name}] evaluating {len(all_evals)} eval set(s)")
        results[name] = run_evals(previous_final, all_evals)
        summary["stages"][name] = record | {"evals": results[name]}
        write_json_atomic(root / "evals.json", results)
        write_text_atomic(root / "retention.md", retention_table(results, all_evals))

    if previous_final is not None:
        _publish(previous_final, root / "final")
    summary["seconds"] = time.perf_counter() - started
    summary["retention"] = retention_table(results, all_evals) if results else ""
    write_json_atomic(root / "summary.json", summary)
    return summary


def _publish(model_dir: Path, target: Path) -> None:
    """Copy the last stage's model to ``<run>/final`` (atomically: copy, then rename)."""
    if model_dir.resolve() == target.resolve():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
