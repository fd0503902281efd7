"""CLI sub-verb ``data synth`` with generators ``bios`` and ``arithmetic``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, renames: dict[str, str]) -> None:
    """One ``--flag`` per config field (defaults and meaning documented once, in the dataclass)."""
    for f in dataclasses.fields(cls):
        flag = "--" + renames.get(f.name, f.name).replace("_", "-")
        parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default,
                            help=f"(default {f.default})")


def register(subparsers: argparse._SubParsersAction) -> None:
    from omnilm.data.synth.arithmetic import ArithmeticConfig
    from omnilm.data.synth.bios import BiosConfig

    p = subparsers.add_parser("synth", help="generate the synthetic corpora (biographies, arithmetic)")
    sub = p.add_subparsers(dest="generator", metavar="GENERATOR", required=True)
    bios = sub.add_parser("bios", help="fictional biographies with held-out-template probes, QA and preferences")
    _add_config_flags(bios, BiosConfig, {})
    bios.add_argument("--out", required=True, metavar="DIR")
    bios.set_defaults(handler=lambda args: _run(args, BiosConfig, "bios"))
    arithmetic = sub.add_parser("arithmetic", help="multi-step word problems with checkable answers")
    _add_config_flags(arithmetic, ArithmeticConfig, {})
    arithmetic.add_argument("--out", required=True, metavar="DIR")
    arithmetic.set_defaults(handler=lambda args: _run(args, ArithmeticConfig, "arithmetic"))


def _run(args: argparse.Namespace, cls: type, generator: str) -> int:
    from omnilm.data.synth.arithmetic import write_arithmetic
    from omnilm.data.synth.bios import write_bios

    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    write = write_bios if generator == "bios" else write_arithmetic
    counts = write(cls(**values), args.out)
    print(", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in counts.items()) + f" -> {args.out}")
    return 0
