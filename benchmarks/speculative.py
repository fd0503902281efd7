"""Speculative decoding versus plain decoding of the same target model, on CPU, batch 1.

What is measured
    A target and a much smaller draft are trained briefly on the same synthetic biographies (omnilm's own
    pipeline: ``write_bios`` (30 people, 40 biographies each) -> ``train_bpe`` -> ``tokenize_corpus`` -> a
    pretrain stage each, in a temporary folder), or loaded with ``--target DIR --draft DIR`` (two model
    folders with the same tokenizer). Each prompt (the first words of a biography) is continued for exactly
    ``--new-tokens`` tokens without end-of-sequence stopping, plainly with ``generate_ids`` and speculatively
    with ``speculative_generate``, greedy and at temperature 1 (same seed for both).

    tokens/s = generated tokens / wall time of all prompts (prefill included), best of ``--repeats`` passes.
    speed-up = speculative tokens/s / plain tokens/s. Acceptance rate = accepted / proposed draft tokens.
    "same tokens" (greedy only) says whether speculative and plain greedy outputs are identical.

How to run
    .venv/bin/python benchmarks/speculative.py                       # trains the pair (a few minutes)
    .venv/bin/python benchmarks/speculative.py --target runs/demo/final --draft runs/small/final --k 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from omnilm.data.synth.bios import BiosConfig, write_bios
from omnilm.data.tokenize import tokenize_corpus
from omnilm.infer.generate import generate_ids
from omnilm.infer.layout import prepare_for_decoding
from omnilm.infer.sampling import SamplingParams
from omnilm.infer.speculative import speculative_generate
from omnilm.model.hf import load_pretrained
from omnilm.model.transformer import Transformer
from omnilm.tokenizer import Tokenizer, train_bpe
from omnilm.train.stage import StageConfig, run_stage

TARGET_SHAPE = {"preset": "tiny", "d_model": 384, "n_layer": 6, "n_head": 6, "n_kv_head": 2, "max_seq_len": 256}
PEOPLE = 30
DRAFT_SHAPE = {"preset": "tiny", "d_model": 128, "n_layer": 1, "n_head": 4, "n_kv_head": 2, "max_seq_len": 256}


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    mode: str
    plain_tps: float
    spec_tps: float
    acceptance: float
    target_passes_per_token: float
    same_tokens: str

    @property
    def speedup(self) -> float:
        return self.spec_tps / self.plain_tps


# ---------------------------------------------------------------------------------------------
# the model pair


def train_pair(work: Path, steps: int, draft_steps: int) -> tuple[Path, Path, list[str]]:
    """Train target and draft on synthetic biographies; (target dir, draft dir, held-out prompts)."""
    # Few people, many biographies each: the models learn them well in a few hundred steps, as a trained
    # pair would, so draft and target mostly agree.
    write_bios(BiosConfig(people=PEOPLE, bios_per_person=40), work / "bios")
    texts = [json.loads(line)["text"] for line in (work / "bios" / "train.jsonl").read_text().splitlines()]
    train_bpe(texts, vocab_size=1024).save(work / "tokenizer")
    tokenize_corpus([str(work / "bios" / "train.jsonl")], work / "tokenizer", work / "tokens", progress=False)
    folders = []
    for name, shape, max_steps in (("target", TARGET_SHAPE, steps), ("draft", DRAFT_SHAPE, draft_steps)):
        config = StageConfig.from_mapping({
            "name": name, "type": "pretrain", "tokenizer": str(work / "tokenizer"), "model": shape,
            "data": {"bios": str(work / "tokens")},
            "train": {"max_steps": max_steps, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "warmup_steps": 20,
                      "log_every": 50, "eval_batches": 2, "progress": False, "device": "cpu", "precision": "fp32"},
        })
        start = time.perf_counter()
        result = run_stage(config, work / name)
        print(f"  trained {name}: {max_steps} steps in {time.perf_counter() - start:.0f} s, "
              f"metrics {result.last_metrics}", flush=True)
        folders.append(result.final_dir)
    # Prompts are openings of biographies of the same people (the model's domain).
    return folders[0], folders[1], texts[::-1]


# ---------------------------------------------------------------------------------------------
# decoding


def plain_run(target: Transformer, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[int]]:
    return [[int(t) for t in generate_ids(target, [prompt], params)] for prompt in prompts]


def spec_run(target: Transformer, draft: Transformer, prompts: Sequence[list[int]], params: SamplingParams,
             k: int) -> tuple[list[list[int]], dict[str, float]]:
    outputs, totals = [], {"proposed": 0, "accepted": 0, "target_forward_passes": 0}
    for prompt in prompts:
        tokens, stats = speculative_generate(target, draft, prompt, params, k=k)
        outputs.append(tokens)
        for key in totals:
            totals[key] += stats[key]
    return outputs, totals


def best_time(fn, repeats: int):  # noqa: ANN001, ANN201 - any zero-argument call
    """(best wall time, result of the last call) after one warm-up call."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench(target: Transformer, draft: Transformer, prompts: Sequence[list[int]], new_tokens: int, k: int,
          repeats: int) -> list[Row]:
    rows = []
    for mode, temperature in (("greedy", 0.0), ("temperature 1", 1.0)):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=0)
        plain_s, plain_out = best_time(lambda p=params: plain_run(target, prompts, p), repeats)
        spec_s, (spec_out, totals) = best_time(lambda p=params: spec_run(target, draft, prompts, p, k), repeats)
        generated = len(prompts) * new_tokens
        same = ("yes" if spec_out == plain_out else "no") if temperature == 0 else "n/a"
        rows.append(Row(mode, generated / plain_s, generated / spec_s, totals["accepted"] / totals["proposed"],
                        totals["target_forward_passes"] / generated, same))
        print(f"  done: {mode}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# report


def table(rows: Sequence[Row]) -> str:
    lines = ["| mode | plain tok/s | speculative tok/s | speed-up | acceptance rate | target passes / token "
             "| same tokens |", "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r.mode} | {r.plain_tps:.1f} | {r.spec_tps:.1f} | {r.speedup:.2f}x | {r.acceptance:.2f} | "
              f"{r.target_passes_per_token:.2f} | {r.same_tokens} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--target", type=Path, default=None, help="target model folder (with --draft)")
    parser.add_argument("--draft", type=Path, default=None, help="draft model folder, same tokenizer")
    parser.add_argument("--steps", type=int, default=700, help="target training steps (when training)")
    parser.add_argument("--draft-steps", type=int, default=1500, help="draft training steps (when training)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per target pass")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=6, help="words of each biography kept as the prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if (args.target is None) != (args.draft is None):
        parser.error("give both --target and --draft, or neither")
    return args


def run(args: argparse.Namespace, target_dir: Path, draft_dir: Path, texts: Sequence[str]) -> str:
    tokenizer = Tokenizer.from_dir(target_dir)
    target = prepare_for_decoding(load_pretrained(target_dir))
    draft = prepare_for_decoding(load_pretrained(draft_dir))
    prompts = [tokenizer.encode(" ".join(text.split()[:args.prompt_words])) for text in texts[:args.prompts]]
    rows = bench(target, draft, prompts, args.new_tokens, args.k, args.repeats)
    return "\n\n".join([
        "# Speculative decoding on CPU (batch 1)",
        f"target {target.num_params() / 1e6:.1f}M params, draft {draft.num_params() / 1e6:.2f}M params, k = {args.k}, "
        f"{len(prompts)} prompts x {args.new_tokens} new tokens, best of {args.repeats} after 1 warm-up",
        table(rows),
        f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}",
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.target is not None:
        # The training text of given folders is unknown; biography openings still make sensible prompts.
        with tempfile.TemporaryDirectory(prefix="omnilm-spec-") as tmp:
            write_bios(BiosConfig(people=PEOPLE, bios_per_person=1), Path(tmp))
            texts = [json.loads(line)["text"] for line in (Path(tmp) / "train.jsonl").read_text().splitlines()]
        report = run(args, args.target, args.draft, texts)
    else:
        with tempfile.TemporaryDirectory(prefix="omnilm-spec-") as tmp:
            target_dir, draft_dir, texts = train_pair(Path(tmp), args.steps, args.draft_steps)
            report = run(args, target_dir, draft_dir, texts)
    print()
    print(report, end="")


if __name__ == "__main__":
    main()
