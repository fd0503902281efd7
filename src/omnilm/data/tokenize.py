"""Tokenise a corpus into flat token shards: ``omnilm data tokenize``.

Layout of the output folder::

    meta.json                       dtype, vocab size, eos id, per-split shard list with token/document counts
    train/shard-00000.bin           the split's token ids back to back, each document followed by <|endoftext|>
    train/shard-00000.docs.npy      int64 start offset of every document in the shard
    val/...                         the same for the held-out split

Shards are raw ``uint16`` (vocabularies up to 65,536) or ``uint32`` arrays so the loader can memory-map them.
Documents go to the validation split by a seeded draw per document in reading order, and workers return
their results in order, so the output is byte-identical whatever the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from omnilm.data.sources import ReadReport, iter_documents
from omnilm.errors import UserError
from omnilm.utils.atomic import atomic_path, write_json_atomic

SPLITS = ("train", "val")
META = "meta.json"
DOCS_PER_TASK = 256  # documents a worker encodes per task: large enough to amortise inter-process traffic
MAX_SHARD_TOKENS = 100_000_000  # ~200 MB per uint16 shard

_worker_backend: Any = None


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _init_worker(tokenizer_file: str) -> None:
    global _worker_backend
    from tokenizers import Tokenizer as BackendTokenizer

    _worker_backend = BackendTokenizer.from_file(tokenizer_file)


def _encode(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _worker_backend.encode_batch(texts, add_special_tokens=False)]


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardWriter:
    """Appends documents of one split to size-capped shard files."""

    def __init__(self, folder: Path, dtype: np.dtype, max_tokens: int) -> None:
        self.folder, self.dtype, self.max_tokens = folder, dtype, max_tokens
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("shard-*"):
            stale.unlink()
        self.shards: list[dict[str, Any]] = []
        self._handle = None
        self._starts: list[int] = []
        self._tokens = 0

    def add(self, ids: list[int]) -> None:
        if self._handle is None or self._tokens >= self.max_tokens:
            self._close_shard()
            self._open_shard()
        self._starts.append(self._tokens)
        np.asarray(ids, dtype=self.dtype).tofile(self._handle)
        self._tokens += len(ids)

    def _open_shard(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        self._path = self.folder / f"{name}.bin"
        self._handle = open(self.folder / f".{name}.bin.tmp", "wb")  # noqa: SIM115 - closed in _close_shard
        self._starts, self._tokens = [], 0

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._handle.name, self._path)
        with atomic_path(self._path.with_suffix(".docs.npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(self._starts, dtype=np.int64))
        rel = f"{self.folder.name}/{self._path.name}"
        self.shards.append({"file": rel, "tokens": self._tokens, "documents": len(self._starts)})
        self._handle = None

    def close(self) -> dict[str, Any]:
        self._close_shard()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards)}


def tokenize_corpus(inputs: Sequence[str], tokenizer_dir: str | Path, out: str | Path, val_fraction: float = 0.01,
                    workers: int | None = None, text_field: str = "text", seed: int = 0, progress: bool = True,
                    strict: bool = False, max_shard_tokens: int = MAX_SHARD_TOKENS) -> dict[str, Any]:
    """Tokenise the documents of ``inputs`` into train/val token shards under ``out``; returns ``meta.json``."""
    from omnilm.tokenizer import Tokenizer

    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise UserError(f"{tokenizer_dir}: the tokenizer has no end-of-text token to separate documents")
    out = Path(out)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(out / split, dtype, max_shard_tokens) for split in SPLITS}
    report = ReadReport()
    texts = (doc.text for doc in iter_documents(list(inputs), text_field, strict=strict, report=report))
    split_rng = np.random.default_rng(seed)
    workers = max(1, workers or os.cpu_count() or 1)
    tokenizer_file = str(Path(tokenizer_dir) / "tokenizer.json")
    bar = tqdm(desc="tokenize", unit="doc", disable=not progress)
    eos = tokenizer.eos_id

    def write(encoded: list[list[int]]) -> None:
        to_val = split_rng.random(len(encoded)) < val_fraction
        for ids, val in zip(encoded, to_val, strict=True):
            writers["val" if val else "train"].add(ids + [eos])
        bar.update(len(encoded))

    if workers == 1:
        _init_worker(tokenizer_file)
        for batch in _batched(texts, DOCS_PER_TASK):
            write(_encode(batch))
    else:
        # fork keeps start-up cheap; the parent has not encoded anything, so the tokenizer's own thread
        # pool is untouched and safe to fork.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer_file,)) as pool:
            for encoded in pool.imap(_encode, _batched(texts, DOCS_PER_TASK), chunksize=1):
                write(encoded)
    bar.close()
    splits = {split: writer.close() for split, writer in writers.items()}
    if report.documents == 0:
        raise UserError(f"no documents found in {', '.join(map(str, inputs))}")
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": eos,
            "tokenizer": str(tokenizer_dir), "seed": seed, "val_fraction": val_fraction, "splits": splits,
            "read": {"files": report.files, "documents": report.documents, "bytes": report.bytes,
                     "replaced_utf8": report.replaced_utf8, "malformed": report.malformed,
                     "problems": report.problems}}
    write_json_atomic(out / META, meta)
    return meta


def read_meta(root: str | Path) -> dict[str, Any]:
    """``meta.json`` of a tokenised dataset folder, with a clear error when it is not one."""
    path = Path(root) / META
    if not path.is_file():
        raise UserError(f"{root}: not a tokenised dataset (no {META}); create one with `omnilm data tokenize`")
    return json.loads(path.read_text(encoding="utf-8"))
