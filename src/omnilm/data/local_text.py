"""Real English text without a download: the documentation that ships with the running Python.

Two sources, both part of every CPython install:

- the language and library reference topics of ``pydoc_data.topics`` (what ``help("with")`` prints; ≈465k
  characters in 3.11), one document per topic, in sorted topic order;
- the docstrings of the standard library's modules, classes and functions (``ast.get_docstring``, cleaned of
  indentation), read from the ``.py`` files of ``sysconfig``'s stdlib folder in sorted path order, without
  ``site-packages`` and test suites (``test``/``tests``/``idle_test`` folders, ``test_*.py``). A docstring seen
  before (exactly the same text, e.g. an inherited ``"Return self."``) is dropped; the rest of a module's
  docstrings form one document, each docstring a paragraph.

The corpus is deterministic for a given Python version (recorded in the statistics) and differs slightly between
versions. It is technical prose with code samples: not a web crawl, but real text written by people, which the
synthetic corpora here are not. ``omnilm data local-text --out FILE.jsonl`` writes it as ``{"text", "source"}``
records for the usual pipeline (``data tokenize``, the recipe ``tokenizer``/``tokenize`` jobs, or the
``local_text`` job).
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.errors import UserError

TEST_FOLDERS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class LocalTextConfig:
    """Which parts of the bundled documentation to take."""

    #: Include the ``pydoc_data.topics`` reference topics.
    topics: bool = True
    #: Include the standard library's docstrings.
    docstrings: bool = True
    #: Drop documents shorter than this many characters (after joining a module's docstrings).
    min_chars: int = 200

    def __post_init__(self) -> None:
        if not (self.topics or self.docstrings):
            raise UserError("local text needs topics, docstrings or both")
        if self.min_chars < 0:
            raise UserError(f"min_chars must be ≥ 0, got {self.min_chars}")


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files (tests and site-packages left out), sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if TEST_FOLDERS.intersection(parts[:-1]) or parts[-1].startswith("test_"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_docstrings(source: str) -> list[str]:
    """The module's, its classes' and its functions' docstrings in source order (empty for unparsable code)."""
    try:
        with warnings.catch_warnings():  # old escape sequences in some modules
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [node for node in ast.walk(tree)
                      if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda node: getattr(node, "lineno", 0))
    docs = [ast.get_docstring(node, clean=True) for node in nodes]
    return [doc.strip() for doc in docs if doc and doc.strip()]


def local_text_documents(config: LocalTextConfig = LocalTextConfig(), stdlib: Path | None = None,
                         ) -> Iterator[dict[str, Any]]:
    """The corpus as ``{"text", "source"}`` records (``source``: ``topics:<name>`` or ``stdlib:<path>``)."""
    if config.topics:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            text = topics[name].strip()
            if len(text) >= config.min_chars:
                yield {"text": text, "source": f"topics:{name}"}
    if config.docstrings:
        root = Path(stdlib or sysconfig.get_paths()["stdlib"])
        seen: set[bytes] = set()
        for path in stdlib_files(root):
            kept = []
            for doc in module_docstrings(path.read_text(encoding="utf-8", errors="replace")):
                digest = hashlib.blake2b(doc.encode(), digest_size=16).digest()
                if digest not in seen:
                    seen.add(digest)
                    kept.append(doc)
            text = "\n\n".join(kept)
            if kept and len(text) >= config.min_chars:
                yield {"text": text, "source": f"stdlib:{path.relative_to(root).as_posix()}"}


def write_local_text(out: str | Path, config: LocalTextConfig = LocalTextConfig()) -> dict[str, Any]:
    """Write the corpus to the jsonl file ``out``; its statistics (documents, characters, Python version)."""
    from omnilm.data.synth.io import write_jsonl

    docs = list(local_text_documents(config))
    write_jsonl(Path(out), docs)
    by_kind = {kind: sum(len(d["text"]) for d in docs if d["source"].startswith(kind)) for kind in ("topics", "stdlib")}
    return {"documents": len(docs), "characters": sum(by_kind.values()), "topic_characters": by_kind["topics"],
            "docstring_characters": by_kind["stdlib"], "python": sys.version.split()[0]}
