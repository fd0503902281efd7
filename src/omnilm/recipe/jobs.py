"""Data-preparation jobs of a recipe: synthesise, clean, train the tokenizer, tokenise.

Each job writes into ``<run>/<out>`` (``out`` defaults to the job's name) and leaves a marker
``.omnilm-job.json`` holding its settings, the fingerprints of the jobs it read (those whose output folders
its ``data``/``tokenizer`` paths point into) and its own fingerprint, a hash of both. A job whose marker
holds its current fingerprint is skipped; one whose settings or inputs changed runs again and says why, and
its new fingerprint in turn reruns the jobs and stages that read its output. Relative paths in a job are
relative to the run folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnilm.config import ConfigError
from omnilm.utils.atomic import write_json_atomic
from omnilm.utils.fingerprint import fingerprint, stale_reasons

MARKER = ".omnilm-job.json"
#: Job settings that name input files or folders (relative to the run folder): they make a job depend on the
#: jobs whose outputs they point into.
INPUT_KEYS = ("data", "tokenizer", "bios", "index", "model", "avoid_names_of")
JobFn = Callable[[dict[str, Any], Path, Path], dict[str, Any]]
JOBS: dict[str, JobFn] = {}


def job(name: str) -> Callable[[JobFn], JobFn]:
    def decorate(fn: JobFn) -> JobFn:
        JOBS[name] = fn
        return fn

    return decorate


def _paths(values: Any, root: Path) -> list[str]:
    items = [values] if isinstance(values, str) else list(values or [])
    return [item if os.path.isabs(item) else str(root / item) for item in items]


def _take(spec: dict[str, Any], allowed: set[str], name: str) -> dict[str, Any]:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"job {name!r}: unknown setting(s) {unknown}; allowed: {sorted(allowed)}")
    return spec


@job("synth_bios")
def synth_bios(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    from omnilm.config import from_dict
    from omnilm.data.synth.bios import BiosConfig, write_bios

    if spec.get("avoid_names_of"):
        spec = spec | {"avoid_names_of": _paths(spec["avoid_names_of"], root)[0]}
    return write_bios(from_dict(BiosConfig, spec, source="synth_bios job"), out)


@job("synth_arithmetic")
def synth_arithmetic(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    from omnilm.config import from_dict
    from omnilm.data.synth.arithmetic import ArithmeticConfig, write_arithmetic

    return write_arithmetic(from_dict(ArithmeticConfig, spec, source="synth_arithmetic job"), out)


@job("synth_calculator")
def synth_calculator(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """Calculator-tool conversations (:mod:`omnilm.data.synth.calculator`)."""
    from omnilm.config import from_dict
    from omnilm.data.synth.calculator import CalculatorConfig, write_calculator

    return write_calculator(from_dict(CalculatorConfig, spec, source="synth_calculator job"), out)


@job("synth_passkey")
def synth_passkey(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """Passkey training documents (:mod:`omnilm.data.synth.passkey`)."""
    from omnilm.config import from_dict
    from omnilm.data.synth.passkey import PasskeyConfig, write_passkey

    return write_passkey(from_dict(PasskeyConfig, spec, source="synth_passkey job"), out)


@job("synth_repeats")
def synth_repeats(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """Repeated random token sequences in ``tokenizer``'s ids (:mod:`omnilm.data.synth.repeats`), a tokenised
    dataset that a pre-training stage mixes in to learn copying from context."""
    from omnilm.config import from_dict
    from omnilm.data.synth.repeats import RepeatsConfig, write_repeats

    spec = dict(spec)
    tokenizer = _paths(spec.pop("tokenizer"), root)[0]
    return write_repeats(tokenizer, out, from_dict(RepeatsConfig, spec, source="synth_repeats job"))


@job("local_text")
def local_text(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """``text.jsonl``: the documentation bundled with Python (:mod:`omnilm.data.local_text`)."""
    from omnilm.config import from_dict
    from omnilm.data.local_text import LocalTextConfig, write_local_text

    return write_local_text(out / "text.jsonl", from_dict(LocalTextConfig, spec, source="local_text job"))


@job("synth_omni")
def synth_omni(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """Spoken, image and video QA (``omnilm data synth omni``): ``scale`` names a size, the other settings are
    ``OmniConfig`` fields; ``bios`` (a biographies job's folder) makes this job depend on that one."""
    from omnilm.data.synth.omni import omni_config, write_omni

    spec = dict(spec)
    scale = spec.pop("scale", "default")
    if spec.get("bios"):
        spec["bios"] = _paths(spec["bios"], root)[0]
    return write_omni(omni_config(scale, spec, source="synth_omni job"), out)


@job("speech_codec")
def speech_codec(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """A speech codec (:mod:`omnilm.omni.codec`) fitted to the spoken replies (``reply_audio``) of the training
    records of ``data`` (jsonl, e.g. a synth_omni job's ``speech.jsonl``): ``codes`` centroids, ``iterations``."""
    from omnilm.data.chat_data import read_records
    from omnilm.omni.audio import load_audio
    from omnilm.omni.codec import fit_codec

    _take(spec, {"data", "codes", "iterations", "seed"}, "speech_codec")
    files: dict[Path, None] = {}
    for path in _paths(spec["data"], root):
        for record, _ in read_records([path], {"split": "train"}, strict=True):
            if record.get("reply_audio"):
                files.setdefault(Path(path).parent / record["reply_audio"])
    if not files:
        raise ConfigError(f"job speech_codec: no training records with reply_audio in {spec['data']}")
    codec = fit_codec((load_audio(f) for f in files), int(spec.get("codes", 256)), int(spec.get("iterations", 30)),
                      int(spec.get("seed", 0)))
    codec.stats.update(files=len(files))
    codec.save(out)
    return {"codes": codec.codes, "files": len(files), "train_mse": round(codec.stats["train_mse"], 5)}


@job("rag_index")
def rag_index(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """A retrieval index (``omnilm rag index``) over the records of ``data``; the other settings are
    :class:`~omnilm.rag.index.IndexConfig` fields."""
    from omnilm.config import from_dict
    from omnilm.data.chat_data import read_records
    from omnilm.rag.index import IndexConfig, RagIndex

    spec = dict(spec)
    paths = _paths(spec.pop("data"), root)
    index = RagIndex.build((r for r, _ in read_records(paths, strict=True)),
                           from_dict(IndexConfig, spec, source="rag_index job"))
    index.save(out)
    return {"passages": len(index.passages)}


@job("rag_qa")
def rag_qa(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """``qa.jsonl``: the chat records of ``data`` (``where``: field filter) with the top ``top_k`` passages of
    ``index`` in their question (:func:`omnilm.rag.records.open_book`; ``top_k`` may be a list to draw each
    record's number of passages from, ``unanswerable`` a share of records whose gold passage is replaced and whose
    reply is "I don't know.", ``seed`` for both draws); ``prefs.jsonl`` instead when ``data`` holds preference
    pairs. A record whose gold passage (``match_field``) is indexed but not retrieved is left out, so that no reply
    states a fact missing from its context."""
    from omnilm.data.chat_data import read_records
    from omnilm.data.synth.io import write_jsonl
    from omnilm.rag.index import RagIndex
    from omnilm.rag.records import open_book

    _take(spec, {"data", "index", "top_k", "match_field", "where", "unanswerable", "seed"}, "rag_qa")
    records = [r for r, _ in read_records(_paths(spec["data"], root), spec.get("where"), strict=True)]
    index = RagIndex.load(_paths(spec["index"], root)[0])
    match_field = spec.get("match_field", "person_id")
    top_k = spec.get("top_k", 3)
    try:
        rewritten, stats = open_book(records, index, top_k if isinstance(top_k, list) else int(top_k), match_field,
                                     float(spec.get("unanswerable", 0.0)), int(spec.get("seed", 0)))
    except ValueError as error:
        raise ConfigError(f"rag_qa job: {error}") from None
    indexed = {p.get(match_field) for p in index.passages}
    kept = [r for r in rewritten
            if r["retrieved_gold"] or r.get("unanswerable") or r.get(match_field) not in indexed]
    pairs = sum("chosen" in r for r in kept)
    if pairs not in (0, len(kept)):
        raise ConfigError(f"rag_qa job: data mixes {pairs} preference pairs with {len(kept) - pairs} chat records")
    write_jsonl(out / ("prefs.jsonl" if pairs else "qa.jsonl"), kept)
    return {"records": len(kept), "left_out": len(rewritten) - len(kept)} | stats


@job("tokenizer")
def train_tokenizer(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    from omnilm.data.sources import iter_documents
    from omnilm.tokenizer import train_bpe

    _take(spec, {"data", "vocab_size", "text_field", "min_frequency"}, "tokenizer")
    texts = (d.text for d in iter_documents(_paths(spec["data"], root), spec.get("text_field", "text")))
    tokenizer = train_bpe(texts, int(spec["vocab_size"]), min_frequency=int(spec.get("min_frequency", 2)))
    tokenizer.save(out)
    return {"vocab_size": tokenizer.vocab_size}


@job("tokenize")
def tokenize(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    from omnilm.data.tokenize import tokenize_corpus

    _take(spec, {"data", "tokenizer", "val_fraction", "workers", "text_field", "seed"}, "tokenize")
    options = {k: spec[k] for k in ("val_fraction", "workers", "text_field", "seed") if k in spec}
    return tokenize_corpus(_paths(spec["data"], root), _paths(spec["tokenizer"], root)[0], out, **options)


@job("grow")
def grow(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    """A grown copy of the model folder ``model`` (``omnilm upcycle`` / ``omnilm grow``): ``method`` upcycle
    (experts, top_k, granularity), depth (mode, overlap, preserve) or width (d_model, d_ff); a stage then
    starts from it with ``init_from``."""
    from omnilm.model.grow_folder import grow_folder

    spec = dict(spec)
    model, method = _paths(spec.pop("model"), root)[0], spec.pop("method", "depth")
    return grow_folder(model, out, method, **spec)


@job("prepare")
def prepare(spec: dict[str, Any], out: Path, root: Path) -> dict[str, Any]:
    from omnilm.config import from_dict
    from omnilm.data.prepare import PrepareConfig, prepare

    spec = dict(spec)
    inputs = _paths(spec.pop("data"), root)
    return prepare(inputs, out, from_dict(PrepareConfig, spec, source="prepare job"))


def job_out(name: str, spec: dict[str, Any], root: Path) -> Path:
    """The folder job ``name`` writes into."""
    return Path(_paths(spec.get("out", name), root)[0])


def job_inputs(spec: dict[str, Any], root: Path) -> list[str]:
    """The files and folders job ``spec`` reads, as absolute paths."""
    return [path for key in INPUT_KEYS if spec.get(key) for path in _paths(spec[key], root)]


def run_job(name: str, spec: dict[str, Any], root: Path, log: Callable[[str], Any] = print,
            upstream: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Run one preparation job unless its output is already complete with the same settings and inputs.

    ``upstream`` maps the jobs it reads (``"job NAME"``) to their fingerprints. Returns the job's result and
    its fingerprint (what jobs and stages reading its output record as their upstream).
    """
    spec = dict(spec)
    kind = spec.pop("job", None)
    if kind not in JOBS:
        raise ConfigError(f"job {name!r}: unknown job type {kind!r} (known: {', '.join(sorted(JOBS))})")
    out = job_out(name, spec, root)
    spec.pop("out", None)
    marker = out / MARKER
    current = {"settings": {"job": kind} | spec, "upstream": dict(upstream or {})}
    current["fingerprint"] = fingerprint(current)
    if marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        if "fingerprint" not in record and record.get("settings") == current["settings"]:
            # Written before fingerprints were recorded: its settings match, adopt it as current.
            record |= current
            write_json_atomic(marker, record)
        if record.get("fingerprint") == current["fingerprint"]:
            log(f"[{name}] {kind}: already done, skipped")
            return record.get("result", {}), current["fingerprint"]
        log(f"[{name}] {kind}: rerunning: {'; '.join(stale_reasons(record, current))}")
        marker.unlink()  # an interrupted rerun must not leave the old marker looking complete
    log(f"[{name}] {kind} -> {out}")
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    result = JOBS[kind](spec, out, root) or {}
    result = json.loads(json.dumps(result, default=str))
    write_json_atomic(marker, current | {"result": result, "seconds": time.perf_counter() - began})
    return result, current["fingerprint"]
