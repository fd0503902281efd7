"""CLI verb ``train``: run a single training stage from a YAML/JSON config."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="run one training stage (works under torchrun for DDP/FSDP)")
    p.add_argument("--config", required=True, help="stage config (YAML/JSON): type, model or init_from, data, train")
    p.add_argument("--out", default=None, help="run folder (default: runs/<stage name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even though the config changed (e.g. a larger train.max_steps)")
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
    from omnilm.train.stage import StageConfig, resume_changes, run_stage

    values = read_mapping(args.config)
    values["train"] = dict(values.get("train") or {}) | parse_overrides(args.set)
    config = StageConfig.from_mapping(values, source=args.config)
    out = args.out or f"runs/{config.name}"
    if args.resume and args.force and int(os.environ.get("RANK", "0")) == 0:
        changes = resume_changes(config, out)
        if changes:
            print(f"omnilm train: resuming under a changed config (--force): {'; '.join(changes)}")
    from omnilm.train.distributed import shutdown

    try:
        result = run_stage(config, out, resume=args.resume, force=args.force)
    finally:
        shutdown()
    if result.status == "interrupted":
        print(f"omnilm train: interrupted at step {result.step}/{result.total_steps}; checkpoint saved in {out}; "
              "continue with --resume")
        return 130
    print(f"omnilm train: done, {result.step} steps; model in {result.final_dir}")
    return 0
