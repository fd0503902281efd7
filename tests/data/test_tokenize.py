"""Tokenising into shards: content, document index, split, worker invariance, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from omnilm.cli import main
from omnilm.data.tokenize import token_dtype, tokenize_corpus
from omnilm.errors import UserError
from omnilm.tokenizer import Tokenizer

DOCS = [f"Document {i}: {'lorem ipsum dolor ' * (i % 7)}café 🙂 {i * 37}" for i in range(300)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    tokenizer.save(root / "tok")
    return {"data": path, "tokenizer": root / "tok", "root": root}


def split_documents(out: Path, split: str) -> list[list[int]]:
    meta = json.loads((out / "meta.json").read_text())
    docs = []
    for shard in meta["splits"][split]["shards"]:
        tokens = np.fromfile(out / shard["file"], dtype=meta["dtype"])
        starts = np.load((out / shard["file"]).with_suffix(".docs.npy"))
        assert len(starts) == shard["documents"] and len(tokens) == shard["tokens"]
        for begin, end in zip(starts, [*starts[1:], len(tokens)], strict=True):
            docs.append(tokens[begin:end].tolist())
    return docs


def test_shards_hold_every_document_once_followed_by_eos(corpus: dict[str, Path], tokenizer: Tokenizer,
                                                         tmp_path: Path) -> None:
    meta = tokenize_corpus([str(corpus["data"])], corpus["tokenizer"], tmp_path, val_fraction=0.2, workers=1,
                           progress=False, max_shard_tokens=2000)
    assert meta["dtype"] == "uint16" and meta["read"]["documents"] == 300
    assert len(meta["splits"]["train"]["shards"]) > 1  # the small cap forces several shards
    train, val = split_documents(tmp_path, "train"), split_documents(tmp_path, "val")
    assert 30 < len(val) < 90 and len(train) + len(val) == 300
    decoded = []
    for ids in train + val:
        assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]
        decoded.append(tokenizer.decode(ids[:-1]))
    assert sorted(decoded) == sorted(DOCS)
    assert train == [tokenizer.encode(d) + [tokenizer.eos_id] for d in DOCS if d in set(decoded[:len(train)])]


def test_output_does_not_depend_on_worker_count(corpus: dict[str, Path], tmp_path: Path) -> None:
    for workers in (1, 2):
        tokenize_corpus([str(corpus["data"])], corpus["tokenizer"], tmp_path / str(workers), val_fraction=0.1,
                        workers=workers, progress=False, seed=4)
    for name in ("train/shard-00000.bin", "train/shard-00000.docs.npy", "val/shard-00000.bin"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()


def test_dtype_follows_vocabulary_size() -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    assert token_dtype(151_936) == np.uint32


def test_bad_input(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": \n{"other": 1}\n{"text": "caf\xe9"}\n')
    meta = tokenize_corpus([str(bad)], corpus["tokenizer"], tmp_path / "out", workers=1, progress=False)
    assert meta["read"]["malformed"] == 2 and meta["read"]["replaced_utf8"] == 1
    assert any("bad.jsonl:2" in p for p in meta["read"]["problems"])
    assert any("bad.jsonl:3" in p for p in meta["read"]["problems"])
    code = main(["data", "tokenize", "--data", str(bad), "--tokenizer", str(corpus["tokenizer"]), "--out",
                 str(tmp_path / "strict"), "--strict", "--workers", "1"])
    assert code == 2 and "bad.jsonl:2" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no documents"):
        tokenize_corpus([str(empty)], corpus["tokenizer"], tmp_path / "e", workers=1, progress=False)


def test_cli(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "tokenize", "--data", str(corpus["data"]), "--tokenizer", str(corpus["tokenizer"]),
                 "--out", str(tmp_path), "--workers", "1", "--val-fraction", "0.05"])
    assert code == 0
    out = capsys.readouterr().out
    assert "read 300 documents" in out and "train:" in out and (tmp_path / "meta.json").is_file()
