"""CLI sub-verb ``data synth`` with generators ``bios``, ``arithmetic``, ``omni`` and ``repeats``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, renames: dict[str, str],
                      unset: bool = False) -> None:
    """One ``--flag`` per config field (defaults and meaning documented once, in the dataclass); with ``unset``
    a flag not given stays None, so that it does not override a scale or config file."""
    for f in dataclasses.fields(cls):
        flag = "--" + renames.get(f.name, f.name).replace("_", "-")
        kind = str if f.default is None else type(f.default)  # optional settings default to None: paths
        parser.add_argument(flag, dest=f.name, type=kind, default=None if unset else f.default,
                            help=f"(default {f.default})")


def register(subparsers: argparse._SubParsersAction) -> None:
    from omnilm.data.synth.arithmetic import ArithmeticConfig
    from omnilm.data.synth.bios import BiosConfig
    from omnilm.data.synth.omni import SCALES, OmniConfig
    from omnilm.data.synth.repeats import RepeatsConfig

    p = subparsers.add_parser("synth", help="generate the synthetic corpora (biographies, arithmetic, multimodal)")
    sub = p.add_subparsers(dest="generator", metavar="GENERATOR", required=True)
    bios = sub.add_parser("bios", help="fictional biographies with held-out-template probes, QA and preferences")
    _add_config_flags(bios, BiosConfig, {})
    bios.add_argument("--out", required=True, metavar="DIR")
    bios.set_defaults(handler=lambda args: _run(args, BiosConfig, "bios"))
    arithmetic = sub.add_parser("arithmetic", help="multi-step word problems with checkable answers")
    _add_config_flags(arithmetic, ArithmeticConfig, {})
    arithmetic.add_argument("--out", required=True, metavar="DIR")
    arithmetic.set_defaults(handler=lambda args: _run(args, ArithmeticConfig, "arithmetic"))
    omni = sub.add_parser("omni", help="spoken questions about the biography people (espeak-ng), image QA and "
                                       "narrated digit videos, with held-out voices and layouts for evaluation")
    omni.add_argument("--scale", choices=sorted(SCALES), default="default",
                      help="named size (smoke: seconds, for tests); a --config file and flags override it")
    omni.add_argument("--config", metavar="FILE", help="YAML or JSON file of OmniConfig settings")
    _add_config_flags(omni, OmniConfig, {}, unset=True)
    omni.add_argument("--out", required=True, metavar="DIR")
    omni.set_defaults(handler=_run_omni)
    repeats = sub.add_parser("repeats", help="random token sequences, each written twice, in a tokenizer's ids: "
                                             "pre-training data for copying from context (a tokenised dataset)")
    _add_config_flags(repeats, RepeatsConfig, {})
    repeats.add_argument("--tokenizer", required=True, metavar="DIR")
    repeats.add_argument("--out", required=True, metavar="DIR")
    repeats.set_defaults(handler=_run_repeats)


def _run(args: argparse.Namespace, cls: type, generator: str) -> int:
    from omnilm.data.synth.arithmetic import write_arithmetic
    from omnilm.data.synth.bios import write_bios

    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    write = write_bios if generator == "bios" else write_arithmetic
    counts = write(cls(**values), args.out)
    print(", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in counts.items()) + f" -> {args.out}")
    return 0


def _run_omni(args: argparse.Namespace) -> int:
    from omnilm.config import read_mapping
    from omnilm.data.synth.omni import OmniConfig, omni_config, write_omni

    values: dict[str, Any] = read_mapping(args.config) if args.config else {}
    values |= {f.name: getattr(args, f.name) for f in dataclasses.fields(OmniConfig)
               if getattr(args, f.name) is not None}
    counts = write_omni(omni_config(args.scale, values, source=args.config or "flags"), args.out)
    print(", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in counts.items()) + f" -> {args.out}")
    return 0


def _run_repeats(args: argparse.Namespace) -> int:
    from omnilm.data.synth.repeats import RepeatsConfig, write_repeats

    meta = write_repeats(args.tokenizer, args.out, RepeatsConfig(**{f.name: getattr(args, f.name)
                                                                   for f in dataclasses.fields(RepeatsConfig)}))
    print(", ".join(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens"
                    for split, info in meta["splits"].items()) + f" -> {args.out}")
    return 0
