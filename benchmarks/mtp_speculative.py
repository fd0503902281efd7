"""Self-speculative decoding with multi-token heads versus plain decoding and versus a separate draft model.

What is measured
    The target of ``benchmarks/speculative.py`` (same shape, data and steps) is trained with ``--heads``
    multi-token-prediction heads (pretrain option ``mtp``, ``--variant``), and the same one-layer draft model is
    trained beside it; or ``--target DIR --draft DIR`` are loaded (the target folder must hold mtp heads).
    The held-out prompts and the timing protocol are those of ``benchmarks/speculative.py`` (one warm-up pass,
    ``--repeats`` interleaved passes, medians with min–max). Three ways of decoding the same target, greedy and at
    temperature 1: plain (``generate_ids``), two-model speculative (``--k`` draft tokens per target pass) and
    self-speculative (the heads draft, as many tokens per pass as there are heads). Acceptance rate = accepted /
    proposed; target passes / token counts the prefill. "same tokens" (greedy) compares with plain decoding.

How to run
    .venv/bin/python benchmarks/mtp_speculative.py                 # trains target (+heads) and draft
    .venv/bin/python benchmarks/mtp_speculative.py --steps 30 --draft-steps 30 --new-tokens 8 --prompts 1 \\
        --repeats 1                                                # smoke run, meaningless numbers
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from speculative import (
    MODES,
    PEOPLE,
    check_lengths,
    held_out_biographies,
    interleaved,
    omnilm_plain,
    omnilm_spec,
    summary,
    train_pair,
)

from omnilm.data.synth.bios import BiosConfig, write_bios
from omnilm.infer.layout import prepare_for_decoding
from omnilm.infer.mtp_draft import MTPDrafter
from omnilm.infer.sampling import SamplingParams
from omnilm.model.hf import load_pretrained
from omnilm.model.mtp import load_heads
from omnilm.tokenizer import Tokenizer


def bench(target_dir: Path, draft_dir: Path, texts: Sequence[str], args: argparse.Namespace) -> str:
    tokenizer = Tokenizer.from_dir(target_dir)
    target = prepare_for_decoding(load_pretrained(target_dir))
    heads = prepare_for_decoding(load_heads(target_dir, target))
    draft = prepare_for_decoding(load_pretrained(draft_dir))
    prompts = [tokenizer.encode(" ".join(text.split()[:args.prompt_words])) for text in texts[:args.prompts]]
    generated = len(prompts) * args.new_tokens
    n_heads = heads.mtp.n_heads
    lines = ["| mode | decoding | tok/s | speed-up | acceptance rate | target passes / token | same tokens |",
             "|---|---|---:|---:|---:|---:|---|"]
    for mode, temperature in MODES:
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=temperature, seed=0)
        calls = {
            "plain": lambda p=params: omnilm_plain(target, prompts, p),
            f"draft model (k = {args.k})": lambda p=params: omnilm_spec(target, draft, prompts, p, args.k),
            f"self-speculative ({n_heads} heads)": lambda p=params: omnilm_spec(
                target, MTPDrafter(target, heads), prompts, p, n_heads),
        }
        results = interleaved(calls, args.repeats)
        plain_tps = sorted(generated / s for s in results["plain"][0])
        for name, (seconds, outputs, totals) in results.items():
            check_lengths(f"{name} ({mode})", outputs, args.new_tokens)
            tps = [generated / s for s in seconds]
            speedup = sorted(tps)[len(tps) // 2] / plain_tps[len(plain_tps) // 2]
            acceptance = "–" if totals is None else f"{totals['accepted'] / max(totals['proposed'], 1):.2f}"
            passes = "1.00" if totals is None else f"{totals['target_forward_passes'] / generated:.2f}"
            same = ("yes" if outputs == results["plain"][1] else "no") if temperature == 0 else "n/a"
            lines.append(f"| {mode} | {name} | {summary(tps)} | {speedup:.2f}x | {acceptance} | {passes} | {same} |")
        print(f"  done: {mode}", flush=True)
    return "\n\n".join([
        "# Self-speculative decoding (multi-token heads) on CPU, batch 1",
        f"target {target.num_params() / 1e6:.1f}M params + {sum(p.numel() for p in heads.parameters()) / 1e6:.2f}M "
        f"in {n_heads} {heads.mtp.variant} heads; draft {draft.num_params() / 1e6:.2f}M params; "
        f"{len(prompts)} held-out prompts x {args.new_tokens} new tokens; medians of {args.repeats} interleaved "
        "runs (min–max).",
        "\n".join(lines),
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}",
    ]) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--target", type=Path, default=None, help="target model folder with mtp heads")
    parser.add_argument("--draft", type=Path, default=None, help="draft model folder, same tokenizer")
    parser.add_argument("--steps", type=int, default=700, help="target training steps (when training)")
    parser.add_argument("--draft-steps", type=int, default=1500, help="draft training steps (when training)")
    parser.add_argument("--heads", type=int, default=3, help="multi-token heads of the trained target")
    parser.add_argument("--variant", choices=("independent", "sequential"), default="sequential")
    parser.add_argument("--k", type=int, default=4, help="draft-model tokens per target pass")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if (args.target is None) != (args.draft is None):
        parser.error("give both --target and --draft, or neither")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="omnilm-mtp-") as tmp:
        if args.target is not None:
            write_bios(BiosConfig(people=PEOPLE, bios_per_person=1), Path(tmp) / "bios")
            target_dir, draft_dir = args.target, args.draft
        else:
            options = {"mtp": {"n_heads": args.heads, "variant": args.variant}}
            target_dir, draft_dir = train_pair(Path(tmp), args.steps, args.draft_steps, options)
        report = bench(target_dir, draft_dir, held_out_biographies(Path(tmp) / "bios"), args)
    print()
    print(report, end="")


if __name__ == "__main__":
    main()
