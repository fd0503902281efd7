"""CLI sub-verb ``data tokenize``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenize", help="(being written)")
    p.set_defaults(handler=lambda args: 1)
