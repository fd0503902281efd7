"""CLI sub-verb ``data local-text``: the documentation bundled with Python as a jsonl corpus (no download)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from omnilm.data.local_text import LocalTextConfig

    defaults = LocalTextConfig()
    p = subparsers.add_parser("local-text", help="real English text without a download: Python's reference topics "
                                                 "and the standard library's docstrings, as jsonl")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--no-topics", dest="topics", action="store_false", help="leave out pydoc_data's topics")
    p.add_argument("--no-docstrings", dest="docstrings", action="store_false",
                   help="leave out the standard library's docstrings")
    p.add_argument("--min-chars", type=int, default=defaults.min_chars,
                   help=f"drop shorter documents (default {defaults.min_chars})")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from omnilm.data.local_text import LocalTextConfig, write_local_text

    stats = write_local_text(args.out, LocalTextConfig(args.topics, args.docstrings, args.min_chars))
    print(f"wrote {stats['documents']:,} documents, {stats['characters']:,} characters "
          f"({stats['topic_characters']:,} of reference topics, {stats['docstring_characters']:,} of docstrings; "
          f"Python {stats['python']}) to {args.out}")
    return 0
