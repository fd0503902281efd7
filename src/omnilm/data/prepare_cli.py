"""CLI sub-verb ``data prepare``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="(being written)")
    p.set_defaults(handler=lambda args: 1)
