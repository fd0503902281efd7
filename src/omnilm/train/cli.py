"""CLI verb ``train``: run a single training stage from a YAML/JSON config."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="run one training stage (works under torchrun for DDP/FSDP)")
    p.add_argument("--config", required=True, help="stage config (YAML/JSON): type, model or init_from, data, train")
    p.add_argument("--out", default=None, help="run folder (default: runs/<stage name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train setting, e.g. --set max_steps=50 (repeatable)")
    p.set_defaults(handler=train)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``key=value`` strings to a mapping; values are parsed as YAML scalars (numbers, booleans, null)."""
    import yaml

    from omnilm.errors import UserError

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def train(args: argparse.Namespace) -> int:
    from omnilm.config import read_mapping
    from omnilm.train.stage import StageConfig, run_stage

    values = read_mapping(args.config)
    values["train"] = dict(values.get("train") or {}) | parse_overrides(args.set)
    config = StageConfig.from_mapping(values, source=args.config)
    out = args.out or f"runs/{config.name}"
    result = run_stage(config, out, resume=args.resume)
    if result.status == "interrupted":
        print(f"omnilm train: interrupted at step {result.step}/{result.total_steps}; checkpoint saved in {out}; "
              "continue with --resume")
        return 130
    print(f"omnilm train: done, {result.step} steps; model in {result.final_dir}")
    return 0
