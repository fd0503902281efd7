"""Running a recipe: preparation jobs, then stages in order, evaluations and the retention table after each.

Everything is resumable, and nothing stale is reused. A stage's fingerprint is a hash of its resolved config
(paths inside the run folder written relative to it, settings that only change logging or checkpointing left
out) and of the fingerprints of the jobs and stages whose folders its paths point into: its data sources'
jobs, its tokenizer, the stage it starts from. A finished stage records it in ``<stage>/stage.json``; a
started one in ``<stage>/stage-spec.json``. On a rerun a stage with the same fingerprint is skipped (finished)
or continues from its latest checkpoint (unfinished); a stage whose fingerprint changed says why, its old folder
is moved to ``<stage>.stale/`` (so no stale checkpoint is resumed) and it trains afresh; the stages after it
that read it then change fingerprint too. After each stage, the evaluations declared by that stage and by
every earlier stage run on its final model, so the retention table shows what each stage kept of earlier
skills. Each result is kept in ``<stage>/evals.json`` under a hash of the stage's fingerprint, the evaluation's
resolved spec and the fingerprints of the jobs it reads; a rerun reads back the results whose hash is
unchanged and computes only the others (delete that file to recompute them all).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnilm.recipe.jobs import job_inputs, job_out, run_job
from omnilm.recipe.recipe import Recipe
from omnilm.utils.atomic import write_json_atomic, write_text_atomic
from omnilm.utils.fingerprint import fingerprint, relative_paths, stale_reasons

if TYPE_CHECKING:
    from omnilm.train.stage import StageConfig

STAGE_DONE = "stage.json"
STAGE_STARTED = "stage-spec.json"
STAGE_EVALS = "evals.json"
STALE_SUFFIX = ".stale"
PATH_KEYS = ("init_from", "tokenizer")
# options that name paths
OPTION_PATH_KEYS = ("teacher", "reward_model", "replay_data", "codec", "eval_data", "exclude_layouts",
                    "fresh_videos")


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


def upstream_of(paths: list[str], producers: dict[str, tuple[Path, str]]) -> dict[str, str]:
    """The producers (label → (output folder, fingerprint)) whose folders hold any of ``paths``, with their
    fingerprints."""
    resolved = [Path(p).resolve() for p in paths]
    return {label: fp for label, (folder, fp) in producers.items()
            if any(p == folder or p.is_relative_to(folder) for p in resolved)}


def _absolute_strings(value: Any) -> list[str]:
    """Every absolute path string in a (nested) stage mapping: after ``resolve_stage`` these are its inputs."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _absolute_strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _absolute_strings(v)]
    return [value] if isinstance(value, str) and Path(value).is_absolute() else []


def stage_record(config: StageConfig, root: Path, producers: dict[str, tuple[Path, str]]) -> dict[str, Any]:
    """What decides whether a stage's result is current: its settings (the resolved config without the
    operational train settings, paths relative to ``root``), the fingerprints of what it reads, and a hash of
    both."""
    from omnilm.train.stage import comparable_config

    settings = comparable_config(config)
    record = {"settings": relative_paths(settings, root),
              "upstream": upstream_of(_absolute_strings(settings), producers)}
    return record | {"fingerprint": fingerprint(record)}


def _retire(stage_dir: Path) -> Path:
    """Move a stale stage folder aside (replacing an older one), so a rerun starts from nothing."""
    target = stage_dir.with_name(stage_dir.name + STALE_SUFFIX)
    shutil.rmtree(target, ignore_errors=True)
    stage_dir.rename(target)
    return target


def check_stage(name: str, stage_dir: Path, current: dict[str, Any], log: Any) -> dict[str, Any] | None:
    """The finished stage's record when it is current (the stage is skipped), else None (it must train: resuming
    an unfinished run of the same fingerprint, or afresh after moving a stale folder aside)."""
    done, started = stage_dir / STAGE_DONE, stage_dir / STAGE_STARTED
    recorded = None
    if done.is_file():
        record = json.loads(done.read_text(encoding="utf-8"))
        if "fingerprint" not in record:
            # Finished before fingerprints were recorded: nothing to compare with, adopt it as current.
            record |= current
            write_json_atomic(done, record)
        if record["fingerprint"] == current["fingerprint"]:
            log(f"[{name}] already complete ({record['steps']} steps), skipped")
            return record
        recorded = record
    elif started.is_file():
        record = json.loads(started.read_text(encoding="utf-8"))
        if record["fingerprint"] == current["fingerprint"]:
            return None
        recorded = record
    if recorded is not None:
        what = "results" if done.is_file() else "checkpoints"
        moved = _retire(stage_dir)
        log(f"[{name}] rerunning: {'; '.join(stale_reasons(recorded, current))} "
            f"(previous {what} moved to {moved.name}/)")
    return None


def eval_keys(evals: dict[str, dict[str, Any]], stage_fingerprint: str, root: Path,
              producers: dict[str, tuple[Path, str]]) -> dict[str, str]:
    """Per evaluation, the hash that decides whether a stored result of it is current: the evaluated stage's
    fingerprint, the spec (paths relative to ``root``) and the fingerprints of the jobs and stages it reads."""
    return {name: fingerprint({"stage": stage_fingerprint, "spec": relative_paths(spec, root),
                               "upstream": upstream_of(_absolute_strings(spec), producers)})
            for name, spec in evals.items()}


def stored_evals(stage_dir: Path, keys: dict[str, str]) -> dict[str, dict[str, float]]:
    """The results in ``<stage>/evals.json`` that are still current for ``keys``."""
    path = stage_dir / STAGE_EVALS
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text(encoding="utf-8"))
    return {name: entry["result"] for name, entry in stored.items()
            if isinstance(entry, dict) and keys.get(name) == entry.get("key")}


def resolve_evals(evals: dict[str, dict[str, Any]], root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec in (evals or {}).items():
        spec = dict(spec)
        if spec.pop("skip", False):  # switched off by a preset
            continue
        for key in ("data", "seen", "codec"):
            if spec.get(key):
                spec[key] = _resolve(spec[key], root)
        if isinstance(spec.get("rag"), dict) and spec["rag"].get("index"):
            spec["rag"] = spec["rag"] | {"index": _resolve(spec["rag"]["index"], root)}
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
    # Output folder and fingerprint of every job and stage so far: what later ones may read.
    producers: dict[str, tuple[Path, str]] = {}
    for name, job in recipe.prepare.items():
        job = dict(job)
        if job.pop("skip", False):  # a job only some presets need (e.g. the speech codec without the Talker)
            log(f"[{name}] skip: true, not run")
            continue
        upstream = upstream_of(job_inputs(job, root), producers)
        summary["jobs"][name], job_fingerprint = run_job(name, job, root, log, upstream)
        producers[f"job {name}"] = (job_out(name, job, root).resolve(), job_fingerprint)

    previous_final: Path | None = None
    all_evals: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, raw in recipe.stages.items():
        raw = dict(raw)
        if raw.pop("skip", False):  # declared in its place in the order, for a preset to turn on
            log(f"[{name}] skip: true, not run")
            continue
        all_evals |= resolve_evals(raw.pop("evals", {}), root)
        spec = resolve_stage(raw, root, previous_final) | {"name": name}
        config = StageConfig.from_mapping(spec, source=f"{recipe.source}: stage {name}")
        stage_dir = root / name
        current = stage_record(config, root, producers)
        record = check_stage(name, stage_dir, current, log)
        if record is None:
            # The published model will come from this run's stages; until then there is none.
            shutil.rmtree(root / "final", ignore_errors=True)
            log(f"[{name}] {config.type}: training into {stage_dir}")
            write_json_atomic(stage_dir / STAGE_STARTED, current)
            began = time.perf_counter()
            # The fingerprint check above already refused stale checkpoints; what may still differ from the
            # checkpoint's own record is only where the run folder lives.
            result = run_stage(config, stage_dir, resume=True, force=True)
            if result.status != "complete":
                summary["interrupted"] = name
                return summary
            # Relative to the run folder, so a run folder can be moved and still resumed.
            record = current | {"type": config.type, "steps": result.step, "seconds": time.perf_counter() - began,
                                "final": str(Path(result.final_dir).resolve().relative_to(root)),
                                "last_metrics": result.last_metrics}
            write_json_atomic(stage_dir / STAGE_DONE, record)
        producers[f"stage {name}"] = (stage_dir.resolve(), record["fingerprint"])
        previous_final = root / record["final"]
        keys = eval_keys(all_evals, record["fingerprint"], root, producers)
        current_results = stored_evals(stage_dir, keys)
        todo = {n: spec for n, spec in all_evals.items() if n not in current_results}
        reused = f", {len(current_results)} unchanged ones read back" if current_results else ""
        log(f"[{name}] evaluating {len(todo)} eval set(s){reused}")
        current_results |= run_evals(previous_final, todo)
        results[name] = {n: current_results[n] for n in all_evals}
        write_json_atomic(stage_dir / STAGE_EVALS, {n: {"key": keys[n], "result": results[name][n]}
                                                    for n in all_evals})
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
