"""Spoken-reply latency: first audio of the streamed voice against whole-utterance synthesis, per ODE solver.

What is measured
    For ``--replies`` held-out replies of a ``speech.jsonl`` (the reference text, its recorded question as the
    prompt), a voice folder speaks each reply two ways, for every solver of ``--solvers`` (``method:steps``):

    stream   ``Voice.speak``: Talker codes feed the block-wise DiT, Griffin–Lim vocodes each block with its context;
             seconds to the first waveform chunk, and the real-time factor (compute seconds per audio second)
    whole    the peer without streaming: all codes first, then the DiT over the whole utterance and one vocoding;
             seconds to its (only) waveform

    Every (reply, solver) pair is run ``--repeats`` times, the solvers and both ways interleaved within each repeat
    after one warm-up pass; medians are reported, with whole / stream as the streaming gain. The DiT's solver only
    changes how the mel is sampled: the Talker's codes are the same for every row.

How to run
    .venv/bin/python benchmarks/speech_latency.py --model runs/omni/final --data runs/omni/media/speech.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from omnilm.omni.processor import OmniProcessor
from omnilm.omni.speech import load_voice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a thinker folder with a voice")
    p.add_argument("--data", required=True, help="speech.jsonl of omnilm data synth omni (held-out replies)")
    p.add_argument("--replies", type=int, default=12, help="held-out replies, spread over the file")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--solvers", default="rk4:10,euler:10,euler:4", help="comma-separated method:steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = Path(args.data).parent
    records = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines()]
    held_out = [r for r in records if r["split"] == "eval"]
    chosen = held_out[::max(len(held_out) // args.replies, 1)][:args.replies]
    voice = load_voice(args.model)
    if voice is None:
        raise SystemExit(f"{args.model} has no voice (talker/ and token2wav/)")
    tokenizer, t2w = voice.tokenizer, voice.token2wav
    processor = OmniProcessor(tokenizer, voice.thinker.config, voice.thinker.media_budget, root)
    prompts = [(processor.collate([processor.encode(r["messages"][:-1], add_generation_prompt=True)],
                                  tokenizer.pad_id or 0, left_pad=True),
                tokenizer.encode(r["messages"][-1]["content"], special=False)) for r in chosen]
    solvers = [(method, int(steps)) for method, steps in (s.split(":") for s in args.solvers.split(","))]

    def stream(batch: dict, reply: list[int]) -> tuple[float, float, float]:
        began, first, samples = time.perf_counter(), None, 0
        for chunk in voice.speak(batch, reply):
            first = time.perf_counter() - began if first is None else first
            samples += len(chunk)
        return first or 0.0, time.perf_counter() - began, samples / voice.sample_rate

    def whole(batch: dict, reply: list[int]) -> float:
        began = time.perf_counter()
        t2w.synthesize(torch.tensor(list(voice.codes(batch, reply))))
        return time.perf_counter() - began

    results: dict[tuple[str, int], dict[str, list[float]]] = {s: {"first": [], "whole": [], "compute": [],
                                                                   "audio": []} for s in solvers}
    for repeat in range(args.repeats + 1):  # pass 0 warms up
        for batch, reply in prompts:
            for solver in solvers:
                t2w.method, t2w.steps = solver
                first, compute, audio = stream(batch, reply)
                peer = whole(batch, reply)
                if repeat:
                    row = results[solver]
                    row["first"].append(first)
                    row["whole"].append(peer)
                    row["compute"].append(compute)
                    row["audio"].append(audio)

    print(f"{len(chosen)} held-out replies × {args.repeats} repeats, {torch.get_num_threads()} threads; "
          f"DiT block {t2w.dit.config.block_size} frames, Griffin–Lim context {t2w.context_frames}")
    print("| solver | first audio, stream (s) | whole utterance (s) | whole / stream | real-time factor |")
    print("|---|---:|---:|---:|---:|")
    for (method, steps), row in results.items():
        first, peer = float(np.median(row["first"])), float(np.median(row["whole"]))
        rtf = sum(row["compute"]) / max(sum(row["audio"]), 1e-9)
        print(f"| {method}, {steps} steps | {first:.3f} | {peer:.3f} | {peer / max(first, 1e-9):.1f}× | {rtf:.2f} |")


if __name__ == "__main__":
    main()
