"""CLI sub-verb ``data synth``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synth", help="(being written)")
    p.set_defaults(handler=lambda args: 1)
