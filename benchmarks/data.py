"""Data-pipeline throughput: MinHash near-dedup (documents/s) and tokenisation (MB/s, one process vs all cores).

What is measured
    A synthetic corpus of ``--mb`` megabytes is written as jsonl into a temporary folder: documents of 100-400
    words drawn from a fixed vocabulary of pronounceable pseudo-words (seeded, so every run writes the same
    bytes), of which ``--dup-fraction`` are copies of an earlier document with 1.5% of their words
    replaced, i.e. near-duplicates whose Jaccard similarity of 5-word shingles is about 0.86 (each replaced word
    changes up to 5 shingles), above the default threshold 0.8.

    (a) near-dedup: ``omnilm.data.dedup.NearDeduper.check`` over every document in order (texts already in
        memory; reading is not timed). Reported: documents/s, MB/s, and how many injected near-duplicates were
        found and how many originals were wrongly removed.
    (b) tokenisation: a byte-level BPE tokenizer (``--vocab-size``) is trained on a sample of the corpus, then
        ``omnilm.data.tokenize.tokenize_corpus`` writes token shards from the jsonl file three times: one
        process with ``tokenizers``' own threading off (the one-core baseline), ``--workers`` processes with it
        off, and one process with it on (what ``workers=1`` gives by default). MB/s = input bytes / wall time
        of the whole call (reading, encoding, writing). The multi-core ratio is the second over the first.

How to run
    .venv/bin/python benchmarks/data.py                    # 50 MB, all cores
    .venv/bin/python benchmarks/data.py --mb 2 --workers 2 # a quick smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "an", "el", "or", "us", "ber", "dan", "fel", "gor",
             "hin", "jas", "kel", "mor", "nal", "pir", "quen", "ros", "tal", "vin", "wes", "zor"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50.0, help="corpus size in megabytes (default: 50)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the multi-core run")
    p.add_argument("--dup-fraction", type=float, default=0.1, help="share of documents that are near-duplicates")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary of the tokenizer")
    p.add_argument("--tokenizer-sample-mb", type=float, default=5.0, help="corpus megabytes to train BPE on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-tokenize", action="store_true", help="measure near-dedup only")
    return p.parse_args(argv)


def make_vocabulary(rng: random.Random, size: int = 20_000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


def make_corpus(megabytes: float, dup_fraction: float, seed: int) -> tuple[list[str], set[int]]:
    """Documents totalling at least ``megabytes`` MB, and the indices of the injected near-duplicates."""
    rng = random.Random(seed)
    vocabulary = make_vocabulary(rng)
    # A Zipf-like word distribution, as in real text: a few words are very frequent.
    cumulative = list(itertools.accumulate(1 / (rank + 10) for rank in range(len(vocabulary))))
    target = int(megabytes * 1e6)
    documents: list[str] = []
    words_of: list[list[str]] = []
    near: set[int] = set()
    size = 0
    while size < target:
        if documents and rng.random() < dup_fraction:
            words = list(words_of[rng.randrange(len(words_of))])
            for position in rng.sample(range(len(words)), max(1, len(words) * 15 // 1000)):
                words[position] = rng.choice(vocabulary)
            near.add(len(documents))
        else:
            words = rng.choices(vocabulary, cum_weights=cumulative, k=rng.randint(100, 400))
            words_of.append(words)
        text = " ".join(words)
        documents.append(text)
        size += len(text.encode("utf-8")) + 12  # + the jsonl framing
    return documents, near


def bench_near_dedup(documents: list[str], near: set[int]) -> dict[str, float]:
    from omnilm.data.dedup import NearDeduper

    dedup = NearDeduper()
    removed: list[int] = []
    start = time.perf_counter()
    for index, text in enumerate(documents):
        if dedup.check(text, str(index)) is not None:
            removed.append(index)
    seconds = time.perf_counter() - start
    megabytes = sum(len(text) for text in documents) / 1e6
    return {"seconds": seconds, "docs_per_s": len(documents) / seconds, "mb_per_s": megabytes / seconds,
            "found": len(near.intersection(removed)), "injected": len(near),
            "wrong": len(set(removed) - near)}


def bench_tokenize(corpus: Path, documents: list[str], args: argparse.Namespace, folder: Path) -> list[dict]:
    from omnilm.data.tokenize import tokenize_corpus
    from omnilm.tokenizer import train_bpe

    sample, size = [], 0
    for text in documents:
        if size >= args.tokenizer_sample_mb * 1e6:
            break
        sample.append(text)
        size += len(text)
    tokenizer_dir = folder / "tokenizer"
    train_bpe(sample, args.vocab_size).save(tokenizer_dir)
    megabytes = corpus.stat().st_size / 1e6
    rows = []
    # ``tokenizers`` encodes a batch on all cores by itself unless TOKENIZERS_PARALLELISM is false (read at each
    # call), so the true one-core baseline switches it off; the last run shows one process with its threads.
    runs = [(1, "false"), (args.workers, "false"), (1, "true")] if args.workers > 1 else [(1, "false"), (1, "true")]
    for workers, parallel in runs:
        os.environ["TOKENIZERS_PARALLELISM"] = parallel
        start = time.perf_counter()
        meta = tokenize_corpus([str(corpus)], str(tokenizer_dir), folder / f"tokens-{workers}-{parallel}",
                               workers=workers, progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(split["tokens"] for split in meta["splits"].values())
        label = f"{workers} process{'es' if workers > 1 else ''}, " + \
            ("tokenizers threads" if parallel == "true" else "1 thread each")
        rows.append({"workers": workers, "label": label, "seconds": seconds, "mb_per_s": megabytes / seconds,
                     "tokens": tokens})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    documents, near = make_corpus(args.mb, args.dup_fraction, args.seed)
    with tempfile.TemporaryDirectory(prefix="omnilm-bench-data-") as tmp:
        folder = Path(tmp)
        corpus = folder / "corpus.jsonl"
        with corpus.open("w", encoding="utf-8") as handle:
            for text in documents:
                handle.write(json.dumps({"text": text}) + "\n")
        megabytes = corpus.stat().st_size / 1e6
        print(f"corpus: {len(documents)} documents, {megabytes:.1f} MB, {len(near)} injected near-duplicates, "
              f"{os.cpu_count()} CPUs\n")

        dedup = bench_near_dedup(documents, near)
        print("| step | parallelism | seconds | documents/s | MB/s |")
        print("|---|---|---:|---:|---:|")
        print(f"| near-dedup (MinHash LSH, 128 perm, 5-word shingles) | 1 process | {dedup['seconds']:.1f} "
              f"| {dedup['docs_per_s']:,.0f} | {dedup['mb_per_s']:.2f} |")
        rows = [] if args.skip_tokenize else bench_tokenize(corpus, documents, args, folder)
        for row in rows:
            print(f"| tokenize (BPE {args.vocab_size}) | {row['label']} | {row['seconds']:.1f} "
                  f"| {len(documents) / row['seconds']:,.0f} | {row['mb_per_s']:.2f} |")
        print(f"\nnear-dedup found {dedup['found']}/{dedup['injected']} injected near-duplicates, "
              f"removed {dedup['wrong']} other documents")
        if len(rows) == 3:
            ratio = rows[1]["mb_per_s"] / rows[0]["mb_per_s"]
            print(f"tokenize: {rows[1]['workers']} processes / 1 process (1 thread each) = {ratio:.2f}x "
                  f"(same token count in every run: {len({row['tokens'] for row in rows}) == 1})")


if __name__ == "__main__":
    main()
