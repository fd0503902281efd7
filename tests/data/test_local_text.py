"""The bundled-documentation corpus: which files and docstrings it takes, deduplication, determinism, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from omnilm.cli import main
from omnilm.data.local_text import LocalTextConfig, local_text_documents, module_docstrings, stdlib_files
from omnilm.data.sources import iter_documents
from omnilm.errors import UserError

SOURCE = '''"""Module doc."""


async def fetch():
    """Fetch doc."""


class Thing:
    """Thing doc."""

    def method(self):
        """Method doc.

            indented line
        """

    def bare(self):
        return 1
'''


def fake_stdlib(root: Path) -> Path:
    files = {
        "abc.py": '"""Abstract base classes, a long enough module docstring."""\ndef f():\n    """Return self."""\n',
        "zlib_like.py": 'def g():\n    """Return self."""\ndef h():\n    """A fresh docstring of its own."""\n',
        "email/parser.py": '"""Parse mail."""\n',
        "test/test_abc.py": '"""Tests."""\n',
        "email/tests/helper.py": '"""Test helper."""\n',
        "idlelib/idle_test/x.py": '"""Idle test."""\n',
        "site-packages/pkg.py": '"""Installed package."""\n',
        "test_top.py": '"""A top-level test."""\n',
        "broken.py": "def (:\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_docstrings_come_in_source_order_cleaned() -> None:
    assert module_docstrings(SOURCE) == ["Module doc.", "Fetch doc.", "Thing doc.",
                                         "Method doc.\n\nindented line"]
    assert module_docstrings("def (:") == []


def test_files_leave_out_tests_and_site_packages(tmp_path: Path) -> None:
    root = fake_stdlib(tmp_path)
    names = [p.relative_to(root).as_posix() for p in stdlib_files(root)]
    assert names == ["abc.py", "broken.py", "email/parser.py", "zlib_like.py"]


def test_documents_are_deduplicated_and_deterministic(tmp_path: Path) -> None:
    root = fake_stdlib(tmp_path)
    config = LocalTextConfig(topics=False, min_chars=0)
    docs = list(local_text_documents(config, stdlib=root))
    assert docs == list(local_text_documents(config, stdlib=root))
    assert [d["source"] for d in docs] == ["stdlib:abc.py", "stdlib:email/parser.py", "stdlib:zlib_like.py"]
    assert docs[0]["text"] == "Abstract base classes, a long enough module docstring.\n\nReturn self."
    assert docs[2]["text"] == "A fresh docstring of its own."  # "Return self." was seen in abc.py
    short = LocalTextConfig(topics=False, min_chars=20)
    assert [d["source"] for d in local_text_documents(short, stdlib=root)] == ["stdlib:abc.py", "stdlib:zlib_like.py"]
    with pytest.raises(UserError, match="topics, docstrings or both"):
        LocalTextConfig(topics=False, docstrings=False)


def test_the_cli_writes_the_reference_topics_for_the_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "topics.jsonl"
    assert main(["data", "local-text", "--out", str(out), "--no-docstrings", "--min-chars", "0"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = sorted(name for name in topics if topics[name].strip())
    assert [r["source"] for r in records] == [f"topics:{name}" for name in expected]
    assert [d.text for d in iter_documents([out])] == [topics[name].strip() for name in expected]
    assert sum(len(r["text"]) for r in records) > 300_000  # the whole language and library reference


def test_the_recipe_job_writes_the_same_corpus(tmp_path: Path) -> None:
    from omnilm.recipe.jobs import JOBS

    stats = JOBS["local_text"]({"docstrings": False}, tmp_path / "text", tmp_path)
    records = [json.loads(line) for line in (tmp_path / "text" / "text.jsonl").read_text().splitlines()]
    assert stats["documents"] == len(records) == sum(len(t.strip()) >= 200 for t in topics.values())
    assert stats["docstring_characters"] == 0 and stats["topic_characters"] == stats["characters"]
