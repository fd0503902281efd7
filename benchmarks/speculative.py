"""Speculative decoding versus plain decoding of the same target model, on CPU, batch 1, omnilm and transformers.

What is measured
    A target and a much smaller draft are trained briefly on the same synthetic biographies (omnilm's own
    pipeline: ``write_bios`` (30 people, 40 biographies each) -> ``train_bpe`` -> ``tokenize_corpus`` -> a
    pretrain stage each, on ``train.jsonl`` only, in a temporary folder), or loaded with ``--target DIR
    --draft DIR`` (two model folders with the same tokenizer).

    Prompts are held out: for each person, the probe sentences of ``eval.jsonl`` (one per attribute, each in
    a held-out template that never occurs in the training text) are joined into a held-out biography, and
    its first ``--prompt-words`` words are the prompt. Draft and target have seen the people, never these
    sentences. Each prompt is continued for exactly ``--new-tokens`` tokens without end-of-sequence stopping,
    greedy and at temperature 1 (no top-k/top-p; same seed for every call), four ways on the same pair:

    - omnilm plain (``generate_ids``) and omnilm speculative (``speculative_generate``, ``--k`` draft tokens);
    - transformers plain ``generate`` and transformers assisted generation (``generate(assistant_model=draft)``,
      transformers' default assistant settings unless ``--hf-assistant-tokens`` is given), both on the same
      weights loaded with ``AutoModelForCausalLM``, with end-of-sequence stopping turned off for target and
      assistant.

    tokens/s = generated tokens / wall time of all prompts (prefill included). Each of the four gets one
    warm-up pass, then ``--repeats`` passes interleaved (A B C D A B C D ...); every tok/s is the median of
    the repeats, with min-max. speed-up = median speculative (assisted) tok/s / median plain tok/s of the
    same library. Acceptance rate = accepted / proposed draft tokens (omnilm only). "same tokens" (greedy
    only) says whether the speculative output equals the plain output of the same library.

How to run
    .venv/bin/python benchmarks/speculative.py                       # trains the pair (a few minutes)
    .venv/bin/python benchmarks/speculative.py --target runs/demo/final --draft runs/small/final --k 4
    .venv/bin/python benchmarks/speculative.py --steps 30 --draft-steps 30 --new-tokens 8 --prompts 1 \\
        --repeats 2                                                  # smoke run, meaningless numbers
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

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
MODES = (("greedy", 0.0), ("temperature 1", 1.0))

Outputs = list[list[int]]


@dataclass(frozen=True)
class Row:
    """One line of the table: one library in one sampling mode."""

    mode: str
    system: str
    plain_tps: list[float]
    spec_tps: list[float]
    acceptance: float | None
    target_passes_per_token: float | None
    same_tokens: str

    @property
    def speedup(self) -> float:
        return statistics.median(self.spec_tps) / statistics.median(self.plain_tps)


# ---------------------------------------------------------------------------------------------
# the model pair and the prompts


def train_pair(work: Path, steps: int, draft_steps: int,
               target_options: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Train target and draft on ``train.jsonl`` of synthetic biographies written to ``work / "bios"``
    (``target_options``: the target's pretrain options, e.g. multi-token heads)."""
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
            "data": {"bios": str(work / "tokens")}, "options": (target_options or {}) if name == "target" else {},
            "train": {"max_steps": max_steps, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "warmup_steps": 20,
                      "log_every": 50, "eval_batches": 2, "progress": False, "device": "cpu", "precision": "fp32"},
        })
        start = time.perf_counter()
        result = run_stage(config, work / name)
        print(f"  trained {name}: {max_steps} steps in {time.perf_counter() - start:.0f} s, "
              f"metrics {result.last_metrics}", flush=True)
        folders.append(result.final_dir)
    return folders[0], folders[1]


def held_out_biographies(bios: Path) -> list[str]:
    """Per seen person, its ``eval.jsonl`` sentences (held-out templates, never training text) joined."""
    sentences: dict[int, list[str]] = {}
    for line in (bios / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        sentences.setdefault(record["person_id"], []).append(record["text"])
    training = (bios / "train.jsonl").read_text()
    # Held-out templates never write training text; drop any sentence that still occurs there verbatim.
    texts = [" ".join(s for s in parts if s not in training) for parts in sentences.values()]
    return [text for text in texts if text]


# ---------------------------------------------------------------------------------------------
# decoding: four ways


def omnilm_plain(target: Transformer, prompts: Sequence[list[int]], params: SamplingParams) -> tuple[Outputs, None]:
    return [[int(t) for t in generate_ids(target, [prompt], params)] for prompt in prompts], None


def omnilm_spec(target: Transformer, draft: Transformer, prompts: Sequence[list[int]], params: SamplingParams,
                k: int) -> tuple[Outputs, dict[str, float]]:
    outputs, totals = [], {"proposed": 0, "accepted": 0, "target_forward_passes": 0}
    for prompt in prompts:
        tokens, stats = speculative_generate(target, draft, prompt, params, k=k)
        outputs.append(tokens)
        for key in totals:
            totals[key] += stats[key]
    return outputs, totals


def load_hf(folder: Path) -> torch.nn.Module:
    """A model folder through transformers, with end-of-sequence stopping turned off (like ``eos_ids=()``)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_run(target: torch.nn.Module, prompts: Sequence[list[int]], temperature: float, new_tokens: int,
           pad_id: int, assistant: torch.nn.Module | None = None,
           assistant_tokens: int | None = None) -> tuple[Outputs, None]:
    """transformers ``generate`` of each prompt (batch 1), plain or assisted by ``assistant``."""
    kwargs: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": new_tokens, "eos_token_id": None,
                              "pad_token_id": pad_id}
    if temperature > 0:
        kwargs |= {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    if assistant is not None:
        kwargs["assistant_model"] = assistant
        if assistant_tokens is not None:
            kwargs |= {"num_assistant_tokens": assistant_tokens, "num_assistant_tokens_schedule": "constant"}
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            torch.manual_seed(0)
            ids = torch.tensor([prompt])
            out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs, None


def check_lengths(name: str, outputs: Outputs, new_tokens: int) -> None:
    lengths = {len(o) for o in outputs}
    if lengths != {new_tokens}:
        raise RuntimeError(f"{name} generated {sorted(lengths)} tokens per prompt, expected exactly {new_tokens}")


def interleaved(calls: dict[str, Callable[[], tuple[Outputs, Any]]],
                repeats: int) -> dict[str, tuple[list[float], Outputs, Any]]:
    """One warm-up call each, then ``repeats`` rounds of every call in turn: (seconds per round, last result)."""
    last = {name: fn() for name, fn in calls.items()}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            last[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: (seconds[name], *last[name]) for name in calls}


def bench(models: dict[str, Any], prompts: Sequence[list[int]], args: argparse.Namespace, pad_id: int) -> list[Row]:
    rows = []
    new_tokens, generated = args.new_tokens, len(prompts) * args.new_tokens
    target, draft, hf_target, hf_draft = (models[n] for n in ("target", "draft", "hf_target", "hf_draft"))
    for mode, temperature in MODES:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=0)
        calls = {
            "omnilm plain": lambda p=params: omnilm_plain(target, prompts, p),
            "omnilm speculative": lambda p=params: omnilm_spec(target, draft, prompts, p, args.k),
            "transformers plain": lambda t=temperature: hf_run(hf_target, prompts, t, new_tokens, pad_id),
            "transformers assisted": lambda t=temperature: hf_run(hf_target, prompts, t, new_tokens, pad_id,
                                                                  hf_draft, args.hf_assistant_tokens),
        }
        results = interleaved(calls, args.repeats)
        for name, (_, outputs, _) in results.items():
            check_lengths(f"{name} ({mode})", outputs, new_tokens)

        def tps(name: str, results: dict = results) -> list[float]:
            return [generated / s for s in results[name][0]]

        def same(plain: str, spec: str, results: dict = results, greedy: bool = temperature == 0) -> str:
            return ("yes" if results[plain][1] == results[spec][1] else "no") if greedy else "n/a"

        totals = results["omnilm speculative"][2]
        rows.append(Row(mode, "omnilm (speculative_generate)", tps("omnilm plain"), tps("omnilm speculative"),
                        totals["accepted"] / max(totals["proposed"], 1), totals["target_forward_passes"] / generated,
                        same("omnilm plain", "omnilm speculative")))
        rows.append(Row(mode, "transformers (assistant_model=)", tps("transformers plain"),
                        tps("transformers assisted"), None, None, same("transformers plain", "transformers assisted")))
        if temperature == 0:
            cross = "yes" if results["omnilm plain"][1] == results["transformers plain"][1] else "no"
            print(f"  done: {mode} (omnilm and transformers plain greedy tokens identical: {cross})", flush=True)
        else:
            print(f"  done: {mode}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# report


def summary(values: Sequence[float]) -> str:
    """``median (min–max)``."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def table(rows: Sequence[Row]) -> str:
    def maybe(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = ["| mode | library | plain tok/s | speculative tok/s | speed-up | acceptance rate | target passes / token "
             "| same tokens |", "|---|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r.mode} | {r.system} | {summary(r.plain_tps)} | {summary(r.spec_tps)} | {r.speedup:.2f}x | "
              f"{maybe(r.acceptance)} | {maybe(r.target_passes_per_token)} | {r.same_tokens} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--target", type=Path, default=None, help="target model folder (with --draft)")
    parser.add_argument("--draft", type=Path, default=None, help="draft model folder, same tokenizer")
    parser.add_argument("--steps", type=int, default=700, help="target training steps (when training)")
    parser.add_argument("--draft-steps", type=int, default=1500, help="draft training steps (when training)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per target pass (omnilm)")
    parser.add_argument("--hf-assistant-tokens", type=int, default=None,
                        help="transformers: fixed num_assistant_tokens (default: transformers' own settings)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=6, help="words of each held-out biography kept")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed passes; medians are reported")
    args = parser.parse_args(argv)
    if (args.target is None) != (args.draft is None):
        parser.error("give both --target and --draft, or neither")
    if args.repeats < 1 or args.prompts < 1:
        parser.error("--repeats and --prompts must be at least 1")
    return args


def run(args: argparse.Namespace, target_dir: Path, draft_dir: Path, texts: Sequence[str]) -> str:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = Tokenizer.from_dir(target_dir)
    models = {"target": prepare_for_decoding(load_pretrained(target_dir)),
              "draft": prepare_for_decoding(load_pretrained(draft_dir)),
              "hf_target": load_hf(target_dir), "hf_draft": load_hf(draft_dir)}
    prompts = [tokenizer.encode(" ".join(text.split()[:args.prompt_words])) for text in texts[:args.prompts]]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows = bench(models, prompts, args, pad_id)
    assistant = ("transformers' default assistant settings" if args.hf_assistant_tokens is None
                 else f"transformers num_assistant_tokens = {args.hf_assistant_tokens} (constant)")
    target, draft = models["target"], models["draft"]
    runs = f"{args.repeats} interleaved run{'s' if args.repeats > 1 else ''}"
    return "\n\n".join([
        "# Speculative decoding on CPU (batch 1): omnilm and transformers, same model pair",
        f"target {target.num_params() / 1e6:.1f}M params, draft {draft.num_params() / 1e6:.2f}M params; omnilm "
        f"k = {args.k}, {assistant}; {len(prompts)} held-out prompts x {args.new_tokens} new tokens.\n"
        f"Every tok/s is the median of {runs} (min–max in brackets), after 1 warm-up pass each; "
        "speed-up = median speculative / median plain tok/s of the same library.",
        table(rows),
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}",
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="omnilm-spec-") as tmp:
        if args.target is not None:
            # The training text of given folders is unknown; held-out-template sentences about the default
            # people are in the domain of biography models, in wording their training text does not use.
            write_bios(BiosConfig(people=PEOPLE, bios_per_person=1), Path(tmp) / "bios")
            target_dir, draft_dir = args.target, args.draft
        else:
            target_dir, draft_dir = train_pair(Path(tmp), args.steps, args.draft_steps)
        report = run(args, target_dir, draft_dir, held_out_biographies(Path(tmp) / "bios"))
    print()
    print(report, end="")


if __name__ == "__main__":
    main()
