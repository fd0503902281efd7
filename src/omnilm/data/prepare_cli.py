"""CLI sub-verb ``data prepare``: clean, filter, scrub and deduplicate raw documents into parquet shards."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# flag -> the PrepareConfig switch it turns off
_OFF_SWITCHES = {"no_normalize": "normalize", "no_filter": "filter", "no_pii": "pii",
                 "no_exact_dedup": "exact_dedup", "no_near_dedup": "near_dedup", "no_progress": "progress"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare", help="clean, filter, scrub PII and deduplicate raw documents into parquet shards",
        description="Read .txt/.jsonl/.parquet files (optionally .gz), folders or globs; write cleaned "
                    "part-NNNNN.parquet shards (columns text, source) and stats.json into --out.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or glob patterns")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--config", type=Path, help="YAML or JSON file with PrepareConfig keys; flags override it")
    p.add_argument("--text-field", help="jsonl key / parquet column of the text (default: text)")
    p.add_argument("--strict", action="store_true", default=None, help="fail on the first malformed record")
    p.add_argument("--no-normalize", action="store_true", help="keep Unicode form and whitespace as read")
    p.add_argument("--no-filter", action="store_true", help="skip the quality rules")
    p.add_argument("--no-pii", action="store_true", help="keep e-mails, phone numbers and IP addresses")
    p.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    p.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates")
    p.add_argument("--near-dedup-threshold", type=float, help="Jaccard similarity of duplicates (default: 0.8)")
    p.add_argument("--shingle-size", type=int, help="words per near-dedup shingle (default: 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _config(args: argparse.Namespace) -> Any:
    from omnilm.config import from_dict, read_mapping
    from omnilm.data.prepare import PrepareConfig

    values = read_mapping(args.config) if args.config else {}
    for flag, key in _OFF_SWITCHES.items():
        if getattr(args, flag):
            values[key] = False
    for key in ("text_field", "strict", "near_dedup_threshold", "shingle_size"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return from_dict(PrepareConfig, values, source=str(args.config or "command line"))


def summary(stats: dict[str, Any]) -> str:
    """The counts of a run as a small aligned table."""
    rows: list[tuple[str, object]] = [
        ("documents in", stats["documents_in"]),
        ("documents out", stats["documents_out"]),
        ("MB in / out", f"{stats['bytes_in'] / 1e6:.2f} / {stats['bytes_out'] / 1e6:.2f}"),
        ("malformed records skipped", stats["malformed"]["count"]),
        ("documents with bytes replaced", stats["replaced_utf8"]),
    ]
    rows += [(f"removed: {reason}", n) for reason, n in stats["removed"].items() if n]
    rows += [(f"PII replaced: {kind}", n) for kind, n in stats["pii_replaced"].items() if n]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value:>12}" for label, value in rows]
    lines += [f"  {problem}" for problem in stats["malformed"]["problems"][:5]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from omnilm.data.prepare import prepare

    stats = prepare(args.inputs, args.out, _config(args))
    print(summary(stats))
    print(f"wrote {len(stats['shards'])} shard(s) and stats.json to {args.out}")
    return 0
