"""CLI verb ``rag``: ``rag index`` builds a retrieval index from jsonl records, ``rag query`` shows what it
retrieves (scores and passages) and the prompt the model would read."""

from __future__ import annotations

import argparse
import dataclasses
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from omnilm.rag.index import IndexConfig

    p = subparsers.add_parser("rag", help="retrieval-augmented answers: build and inspect a BM25 passage index")
    sub = p.add_subparsers(dest="rag_verb", metavar="VERB", required=True)
    build = sub.add_parser("index", help="index the records of jsonl files (one passage per record)")
    build.add_argument("--data", nargs="+", required=True, metavar="FILE", help="jsonl files or folders")
    build.add_argument("--out", required=True, metavar="DIR")
    for f in dataclasses.fields(IndexConfig):
        kind = str if f.default is None else type(f.default)
        build.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                           help=f"(default {f.default})")
    build.set_defaults(handler=run_index)
    query = sub.add_parser("query", help="the top passages (with BM25 scores) for each question")
    query.add_argument("--index", required=True, metavar="DIR")
    query.add_argument("question", nargs="+")
    query.add_argument("--top-k", type=int, default=3)
    query.add_argument("--min-score", type=float, default=None, help="relevance threshold (default: the index's)")
    query.add_argument("--prompt", action="store_true", help="print the user turn the model would read instead")
    query.set_defaults(handler=run_query)


def run_index(args: argparse.Namespace) -> int:
    from omnilm.data.chat_data import read_records
    from omnilm.rag.index import IndexConfig, RagIndex

    config = IndexConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(IndexConfig)})
    index = RagIndex.build((r for r, _ in read_records(args.data, strict=True)), config)
    index.save(args.out)
    print(f"omnilm rag index: {len(index.passages):,} passages -> {args.out}")
    return 0


def run_query(args: argparse.Namespace) -> int:
    from omnilm.rag.index import RagIndex
    from omnilm.rag.prompt import render_context

    index = RagIndex.load(args.index)
    for question, hits in zip(args.question, index.search(args.question, args.top_k, args.min_score), strict=True):
        if args.prompt:
            print(render_context(question, [h.text for h in hits]))
            continue
        print(json.dumps({"question": question, "hits": [{"score": round(h.score, 4), "position": h.position}
                                                          | h.record for h in hits]}, ensure_ascii=False))
    return 0
