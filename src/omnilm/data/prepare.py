"""``omnilm data prepare``: raw documents in, cleaned and deduplicated parquet shards plus ``stats.json`` out.

One streaming pass per document: normalise → scrub PII → drop if empty → quality rules → exact dedup → near
dedup → write. Every document read ends up either written or counted under exactly one removal reason, so
``documents_in == documents_out + removed_total`` always holds; records that could not be read at all are
counted separately under ``malformed``.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from omnilm.config import ConfigError, from_dict, to_dict
from omnilm.data.clean import PII_KINDS, normalize_text, scrub_pii
from omnilm.data.filters import QualityThresholds, failed_rule, rule_names
from omnilm.data.sources import MAX_LISTED_PROBLEMS, ReadReport, iter_documents
from omnilm.errors import UserError
from omnilm.utils.atomic import atomic_path, write_json_atomic

SHARD_PATTERN = "part-{:05d}.parquet"
ROW_GROUP_ROWS = 10_000  # rows buffered in memory before they are written out as one parquet row group


@dataclass
class PrepareConfig:
    """Every switch of the cleaning pipeline; a YAML file with these keys is ``--config``."""

    text_field: str = "text"  # jsonl key / parquet column holding the text
    strict: bool = False  # a malformed record fails the run instead of being skipped and listed
    normalize: bool = True  # NFC, whitespace clean-up
    filter: bool = True  # the quality rules of ``filters``
    filters: QualityThresholds = field(default_factory=QualityThresholds)  # a mapping in YAML
    pii: bool = True  # e-mail, phone and IP addresses replaced by <EMAIL>, <PHONE>, <IP>
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity of word shingles at which docs are duplicates
    shingle_size: int = 5  # words per shingle
    num_perm: int = 128  # MinHash permutations: more is more precise and slower
    shard_documents: int = 100_000  # documents per output parquet shard
    progress: bool = True  # a progress bar on stderr

    def __post_init__(self) -> None:
        if isinstance(self.filters, dict):
            self.filters = from_dict(QualityThresholds, self.filters, source="filters")
        if not isinstance(self.filters, QualityThresholds):
            raise ConfigError(f"filters: expected a mapping, got {type(self.filters).__name__}")
        if not 0 < self.near_dedup_threshold <= 1:
            raise ConfigError(f"near_dedup_threshold must be in (0, 1], got {self.near_dedup_threshold}")
        if self.shingle_size < 1:
            raise ConfigError(f"shingle_size must be >= 1, got {self.shingle_size}")
        if self.num_perm < 2:
            raise ConfigError(f"num_perm must be >= 2, got {self.num_perm}")
        if self.shard_documents < 1:
            raise ConfigError(f"shard_documents must be >= 1, got {self.shard_documents}")


class _ShardWriter:
    """Writes ``(text, source)`` rows into numbered parquet shards, each renamed into place once complete."""

    def __init__(self, out: Path, shard_documents: int) -> None:
        import pyarrow as pa

        self.out = out
        self.shard_documents = shard_documents
        self.schema = pa.schema([("text", pa.string()), ("source", pa.string())])
        self.shards: list[Path] = []
        self._stack: contextlib.ExitStack | None = None
        self._writer: Any = None
        self._in_shard = 0
        self._texts: list[str] = []
        self._sources: list[str] = []

    def __enter__(self) -> _ShardWriter:
        return self

    def add(self, text: str, source: str) -> None:
        if self._writer is None:
            self._open()
        self._texts.append(text)
        self._sources.append(source)
        self._in_shard += 1
        if len(self._texts) >= ROW_GROUP_ROWS:
            self._flush()
        if self._in_shard >= self.shard_documents:
            self._finish_shard()

    def _open(self) -> None:
        import pyarrow.parquet as pq

        path = self.out / SHARD_PATTERN.format(len(self.shards))
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(path))
        self._writer = pq.ParquetWriter(tmp, self.schema)
        self.shards.append(path)
        self._in_shard = 0

    def _flush(self) -> None:
        import pyarrow as pa

        if self._texts:
            self._writer.write_table(pa.table([self._texts, self._sources], schema=self.schema))
            self._texts, self._sources = [], []

    def _finish_shard(self) -> None:
        self._flush()
        self._writer.close()
        self._writer = None
        assert self._stack is not None
        self._stack.close()  # renames the temporary file onto the shard's name

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._writer is None:
            if kind is None and not self.shards:
                self._open()  # no document kept: still write one empty shard, so readers find the schema
                self._finish_shard()
            return
        if kind is None:
            self._finish_shard()
            return
        self._writer.close()
        assert self._stack is not None
        self._stack.__exit__(kind, error, trace)  # removes the half-written temporary file


def _remove_stale_shards(out: Path, written: list[Path]) -> None:
    """Shards of an earlier, larger run in the same folder would otherwise be read as part of this one."""
    keep = {path.name for path in written}
    for path in out.glob("part-*.parquet"):
        if path.name not in keep:
            path.unlink()


def prepare(inputs: list[str], out: Path, config: PrepareConfig) -> dict[str, Any]:
    """Clean, filter and deduplicate the documents of ``inputs`` into ``out``; return (and save) the stats."""
    from tqdm import tqdm

    from omnilm.data.dedup import ExactDeduper, NearDeduper

    out = Path(out)
    report = ReadReport()
    documents = iter_documents(inputs, text_field=config.text_field, strict=config.strict, report=report)
    removed: Counter[str] = Counter({name: 0 for name in _removal_reasons(config)})
    pii: Counter[str] = Counter({kind: 0 for kind in PII_KINDS})
    duplicates: list[dict[str, str]] = []
    exact = ExactDeduper() if config.exact_dedup else None
    near = NearDeduper(config.near_dedup_threshold, config.num_perm, config.shingle_size) if config.near_dedup \
        else None
    kept = bytes_out = 0

    def duplicate(kind: str, where: str, first: str) -> None:
        removed[kind] += 1
        if len(duplicates) < MAX_LISTED_PROBLEMS:
            duplicates.append({"document": where, "duplicate_of": first, "kind": kind})

    with _ShardWriter(out, config.shard_documents) as writer, \
            tqdm(documents, desc="prepare", unit=" docs", disable=not config.progress, file=sys.stderr) as bar:
        for document in bar:
            where = document.where
            text = normalize_text(document.text) if config.normalize else document.text
            if config.pii:
                text, found = scrub_pii(text)
                pii.update(found)
            if not text.strip():
                removed["empty_after_cleaning"] += 1
                continue
            if config.filter:
                rule = failed_rule(text, config.filters)
                if rule is not None:
                    removed[rule] += 1
                    continue
            if exact is not None and (first := exact.check(text, where)) is not None:
                duplicate("exact_duplicate", where, first)
                continue
            if near is not None and (first := near.check(text, where)) is not None:
                duplicate("near_duplicate", where, first)
                continue
            writer.add(text, where)
            kept += 1
            bytes_out += len(text.encode("utf-8"))
        if report.documents == 0:
            detail = f" ({report.malformed} malformed records skipped, e.g. {report.problems[0]})" \
                if report.problems else ""
            raise UserError(f"input is empty: no documents in {', '.join(map(str, inputs))}{detail}")
    _remove_stale_shards(out, writer.shards)

    stats: dict[str, Any] = {
        "inputs": [str(item) for item in inputs],
        "files": report.files,
        "documents_in": report.documents,
        "documents_out": kept,
        "removed_total": sum(removed.values()),
        "removed": dict(removed),
        "bytes_in": report.bytes,
        "bytes_out": bytes_out,
        "replaced_utf8": report.replaced_utf8,
        "malformed": {"count": report.malformed, "problems": list(report.problems)},
        "pii_replaced": dict(pii),
        "duplicates": duplicates,  # the first MAX_LISTED_PROBLEMS removed duplicates and what they repeated
        "shards": [path.name for path in writer.shards],
        "config": to_dict(config),
    }
    if stats["documents_in"] != stats["documents_out"] + stats["removed_total"]:
        raise AssertionError(f"prepare lost documents: {stats['documents_in']} in, {kept} out, "
                             f"{stats['removed_total']} removed")
    write_json_atomic(out / "stats.json", stats)
    return stats


def _removal_reasons(config: PrepareConfig) -> list[str]:
    """Every reason a document can be removed for under ``config``, so that zero counts show too."""
    reasons = ["empty_after_cleaning"]
    if config.filter:
        reasons += rule_names(config.filters)
    if config.exact_dedup:
        reasons.append("exact_duplicate")
    if config.near_dedup:
        reasons.append("near_duplicate")
    return reasons

