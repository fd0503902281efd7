"""CLI verb ``tokenizer`` with sub-verbs ``train`` and ``eval``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train or evaluate a byte-level BPE tokenizer")
    p.add_subparsers(dest="tokenizer_verb", metavar="SUBVERB", required=True)
