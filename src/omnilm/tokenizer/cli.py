"""CLI verb ``tokenizer`` with sub-verbs ``train`` and ``eval``."""

from __future__ import annotations

import argparse
from typing import Any

# 256 byte tokens and the special tokens come before any merge.
BYTE_ALPHABET = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train or evaluate a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="tokenizer_verb", metavar="SUBVERB", required=True)

    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on raw documents",
                       description="Train a byte-level BPE tokenizer and save it as a folder that "
                                   "transformers.AutoTokenizer loads (with the ChatML chat template).")
    t.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".txt/.jsonl/.parquet files (optionally .gz), folders or glob patterns")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet (default: text)")
    t.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default: 2)")
    t.add_argument("--family", default=None, choices=("bert", "electra", "t5", "bart"),
                   help="also add this model family's special tokens ([CLS] [SEP] [MASK] [PAD]; T5's 100 "
                        "sentinels <extra_id_N>; BART's <mask>)")
    t.set_defaults(handler=run_train)

    e = sub.add_parser("eval", help="measure a tokenizer on raw documents",
                       description="Print bytes per token, vocabulary use and round-trip failures; "
                                   "exit 1 if any document does not survive decode(encode(text)).")
    e.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    e.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".txt/.jsonl/.parquet files (optionally .gz), folders or glob patterns")
    e.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet (default: text)")
    e.set_defaults(handler=run_eval)


def _read_note(report: Any) -> str:
    """What reading skipped or repaired, so that bad input does not pass unnoticed."""
    notes = []
    if report.malformed:
        notes.append(f"{report.malformed} malformed records skipped (first: {report.problems[0]})")
    if report.replaced_utf8:
        notes.append(f"{report.replaced_utf8} documents had invalid UTF-8 replaced")
    return "; ".join(notes)


def run_train(args: argparse.Namespace) -> int:
    from omnilm.data.sources import ReadReport, iter_documents
    from omnilm.errors import UserError
    from omnilm.tokenizer import SPECIAL_TOKENS, train_bpe
    from omnilm.tokenizer.families import family_special_tokens

    specials = SPECIAL_TOKENS + family_special_tokens(args.family or "")
    smallest = BYTE_ALPHABET + len(specials) + 1
    if args.vocab_size < smallest:
        raise UserError(f"--vocab-size {args.vocab_size} is too small: at least {smallest} (256 bytes, "
                        f"{len(specials)} special tokens and one merge)")
    if args.min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {args.min_frequency}")
    report = ReadReport()
    texts = (doc.text for doc in iter_documents(args.data, text_field=args.text_field, report=report))
    tokenizer = train_bpe(texts, vocab_size=args.vocab_size, special_tokens=specials,
                          min_frequency=args.min_frequency)
    if report.documents == 0:
        raise UserError(f"no documents with a {args.text_field!r} field in {' '.join(args.data)}")
    tokenizer.save(args.out)
    print(f"wrote {args.out}: vocab size {tokenizer.vocab_size} "
          f"({len(specials)} special tokens), trained on {report.documents} documents, "
          f"{report.bytes:,} bytes from {report.files} files")
    if args.vocab_size > tokenizer.vocab_size:
        print(f"note: the corpus supports only {tokenizer.vocab_size} of the {args.vocab_size} tokens asked for "
              f"(no further pair occurs at least {args.min_frequency} times)")
    note = _read_note(report)
    if note:
        print(f"note: {note}")
    return 0


def format_metrics(metrics: dict[str, Any]) -> str:
    """The metrics of :func:`omnilm.tokenizer.evaluate.evaluate_tokenizer` as a two-column table."""
    rows = [
        ("documents", f"{metrics['documents']:,}"),
        ("bytes", f"{metrics['bytes']:,}"),
        ("tokens", f"{metrics['tokens']:,}"),
        ("bytes per token", f"{metrics['bytes_per_token']:.3f}"),
        ("vocab size", f"{metrics['vocab_size']:,}"),
        ("vocab use", f"{metrics['vocab_use']:.1%} ({metrics['distinct_tokens']:,} distinct tokens)"),
        ("round-trip failures", f"{metrics['round_trip_failures']:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    for example in metrics["failure_examples"]:
        lines.append(f"  document {example['document']}: {example['text']!r} -> {example['decoded']!r}")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    from omnilm.data.sources import ReadReport, iter_documents
    from omnilm.errors import UserError
    from omnilm.tokenizer import Tokenizer
    from omnilm.tokenizer.evaluate import evaluate_tokenizer

    tokenizer = Tokenizer.from_dir(args.tokenizer)
    report = ReadReport()
    texts = (doc.text for doc in iter_documents(args.data, text_field=args.text_field, report=report))
    metrics = evaluate_tokenizer(tokenizer, texts)
    if metrics["documents"] == 0:
        raise UserError(f"no documents with a {args.text_field!r} field in {' '.join(args.data)}")
    print(format_metrics(metrics))
    note = _read_note(report)
    if note:
        print(f"note: {note}")
    return 1 if metrics["round_trip_failures"] else 0
