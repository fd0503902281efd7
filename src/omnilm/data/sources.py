"""Reading raw documents from ``.txt``, ``.jsonl`` and ``.parquet`` files (optionally ``.gz``), folders and globs.

Every document carries where it came from (file and 1-based line, or parquet row), so that later stages can
report a bad record precisely. Bad input never disappears silently: undecodable bytes are replaced and
counted, malformed records are skipped and listed in :class:`ReadReport` (or fail the run when ``strict``).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omnilm.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
MAX_LISTED_PROBLEMS = 100  # problems beyond this are counted, not listed


@dataclass(frozen=True)
class Document:
    """One document and its origin: ``line`` is the 1-based line (jsonl), row (parquet) or 1 (txt)."""

    text: str
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class ReadReport:
    """What reading found besides documents."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    replaced_utf8: int = 0  # documents in which undecodable bytes were replaced with U+FFFD
    malformed: int = 0  # records skipped: invalid JSON, missing or non-string field
    problems: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str, strict: bool) -> None:
        message = f"{where}: {reason}"
        if strict:
            raise UserError(f"{message} (run without --strict to skip such records)")
        self.malformed += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(message)


def _base_suffix(path: Path) -> str:
    """``.jsonl`` for ``x.jsonl`` and ``x.jsonl.gz``."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named directly, found recursively in folders, or matched by glob patterns, sorted within each."""
    files: list[Path] = []
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _base_suffix(p) in SUFFIXES)
            if not found:
                raise UserError(f"{item}: folder holds no {'/'.join(SUFFIXES)} files (optionally .gz)")
            files.extend(found)
        elif path.is_file():
            if _base_suffix(path) not in SUFFIXES:
                raise UserError(f"{item}: unsupported file type (expected {', '.join(SUFFIXES)}, optionally .gz)")
            files.append(path)
        elif any(ch in item for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True)
                             if Path(p).is_file() and _base_suffix(Path(p)) in SUFFIXES)
            if not matched:
                raise UserError(f"{item}: pattern matches no input files")
            files.extend(matched)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    if not files:
        raise UserError("no input files given")
    return files


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as handle:
            return handle.read()
    return path.read_bytes()


def _decode(raw: bytes, report: ReadReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.replaced_utf8 += 1
        return raw.decode("utf-8", errors="replace")


def _open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        yield from handle


def iter_jsonl_records(path: Path, strict: bool, report: ReadReport) -> Iterator[tuple[dict, str]]:
    """The JSON objects of a jsonl file with their ``file:line``; invalid lines are skipped and reported."""
    for number, raw in enumerate(_open_lines(path), start=1):
        if not raw.strip():
            continue
        report.bytes += len(raw)
        where = f"{path}:{number}"
        try:
            record = json.loads(_decode(raw, report))
        except json.JSONDecodeError as err:
            report.skip(where, f"invalid JSON ({err.msg})", strict)
            continue
        if not isinstance(record, dict):
            report.skip(where, "not a JSON object", strict)
            continue
        yield record, where


def _iter_jsonl(path: Path, text_field: str, strict: bool, report: ReadReport) -> Iterator[Document]:
    for record, where in iter_jsonl_records(path, strict, report):
        value = record.get(text_field)
        if not isinstance(value, str):
            reason = "no field" if text_field not in record else "non-string field"
            report.skip(where, f"{reason} {text_field!r}", strict)
            continue
        yield Document(value, str(path), int(where.rsplit(":", 1)[1]))


def _iter_parquet(path: Path, text_field: str, strict: bool, report: ReadReport) -> Iterator[Document]:
    import pyarrow.parquet as pq

    source = io.BytesIO(_read_bytes(path)) if path.suffix == ".gz" else path
    try:
        parquet = pq.ParquetFile(source)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: not a readable parquet file ({err})") from err
    if text_field not in parquet.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                report.skip(f"{path}:{row}", f"non-string field {text_field!r}", strict)
                continue
            report.bytes += len(value.encode("utf-8", errors="replace"))
            yield Document(value, str(path), row)


def iter_documents(inputs: Sequence[str | Path], text_field: str = "text", strict: bool = False,
                   report: ReadReport | None = None) -> Iterator[Document]:
    """Yield the documents of every input in order. ``.txt`` files are one document each.

    Problems are accumulated in ``report`` (pass one in to read it afterwards).
    """
    report = report if report is not None else ReadReport()
    for path in expand_inputs(inputs):
        report.files += 1
        kind = _base_suffix(path)
        if kind == ".txt":
            raw = _read_bytes(path)
            report.bytes += len(raw)
            documents: Iterator[Document] = iter([Document(_decode(raw, report), str(path), 1)])
        elif kind == ".jsonl":
            documents = _iter_jsonl(path, text_field, strict, report)
        else:
            documents = _iter_parquet(path, text_field, strict, report)
        for document in documents:
            report.documents += 1
            yield document
