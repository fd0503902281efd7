"""CLI sub-verb ``data tokenize``: documents in, train/val token shards out."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenize", help="tokenise documents into packed train/val token shards")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="files (.txt/.jsonl/.parquet, optionally .gz), folders or globs")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="folder with tokenizer.json")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text (default text)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--strict", action="store_true", help="fail on a malformed record instead of skipping it")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from omnilm.data.tokenize import tokenize_corpus

    meta = tokenize_corpus(args.data, args.tokenizer, args.out, val_fraction=args.val_fraction,
                           workers=args.workers, text_field=args.text_field, seed=args.seed, strict=args.strict)
    read = meta["read"]
    print(f"read {read['documents']:,} documents ({read['bytes'] / 1e6:.1f} MB) from {read['files']} file(s); "
          f"{read['malformed']} malformed skipped, {read['replaced_utf8']} with invalid UTF-8 replaced")
    for problem in read["problems"][:10]:
        print(f"  skipped {problem}")
    for split, info in meta["splits"].items():
        print(f"{split:>5}: {info['documents']:,} documents, {info['tokens']:,} tokens ({meta['dtype']}), "
              f"{len(info['shards'])} shard(s)")
    print(f"wrote {args.out}")
    return 0
