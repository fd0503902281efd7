"""Load test of ``omnilm serve`` against transformers ``generate`` in batches, same prompts and weights.

What is measured
    A server process is started on a free loopback port for ``--model`` (default: a small random Llama with
    the demo's shape written to a temporary folder; pass ``--model runs/demo/final`` for the demo's model).
    ``--clients`` threads (default 32) each send streaming chat completions back to back for ``--seconds``
    (greedy, at most ``--max-tokens`` new tokens, prompts cycling through ``--prompts`` short user messages).
    The server is warmed up first (one request per client, untimed). Reported per run: generated tokens/s
    (the sum of ``usage.completion_tokens``, which never counts the end-of-sequence token, over the wall
    time from the first request until the last answer), completed requests/s, time to first token
    (p50/p99), inter-token latency (p50/p99, time between streamed chunks) and errors (must be 0). The
    server's figures include HTTP, JSON and SSE overhead and the client threads running in this process.

    Peer: transformers ``generate`` in this process, same weights (loaded from the folder), same prompts
    chat-formatted exactly as the server formats them (``encode_chat``), left-padded into batches of
    ``--batch-sizes`` (default 1, 8 and 32) with attention masks, greedy, the same ``max_new_tokens``, stopping
    on ``<|im_end|>`` or end-of-sequence. Each batch size gets one warm-up batch, then runs batches for
    ``--peer-seconds``; its tokens are counted like the server's: the generated tokens of each row before its
    first ``<|im_end|>``/end-of-sequence token (that token and the padding after it are not counted). The
    best batch size (by median tokens/s) is the reference.

    Also omnilm's engine alone, in this process without HTTP: ``--clients`` requests kept in flight for
    ``--peer-seconds`` (the same prompts, settings and token counting), to show what the HTTP/SSE path costs.

    Server runs and peer measurements are interleaved (server, peer, server, peer, ... ``--repeats`` times);
    every figure is the median over the runs, with min-max. ratio = median server tokens/s / median tokens/s
    of the best peer batch size.

How to run
    .venv/bin/python benchmarks/serve_load.py                      # 32 clients, 3 x (20 s + 3 x 5 s): ~2 min
    .venv/bin/python benchmarks/serve_load.py --clients 8 --seconds 10 --model runs/demo/final
    .venv/bin/python benchmarks/serve_load.py --seconds 3 --clients 4 --repeats 2 --peer-seconds 1  # smoke
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: a random demo-shaped model)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients of the server")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each server run")
    p.add_argument("--max-tokens", type=int, default=32, help="most new tokens per request (server and peer)")
    p.add_argument("--prompts", type=int, default=64, help="distinct prompts cycled through by both")
    p.add_argument("--batch-sizes", default="1,8,32", help="peer batch sizes, comma-separated")
    p.add_argument("--peer-seconds", type=float, default=5.0, help="timed seconds per peer batch size and run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved server/peer runs; medians are reported")
    p.add_argument("--max-batch", type=int, default=None, help="passed to omnilm serve (default: its own)")
    p.add_argument("--kv-budget-mb", type=int, default=None, help="passed to omnilm serve (default: its own)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.repeats < 1 or args.clients < 1 or args.prompts < 1 or not args.batch_sizes:
        p.error("--repeats, --clients, --prompts and --batch-sizes must be positive")
    return args


def random_model(folder: Path) -> Path:
    """A tiny random Llama with a small BPE tokenizer (chat tokens included), saved as a model folder."""
    from omnilm.model.config import get_preset
    from omnilm.model.hf import save_pretrained
    from omnilm.model.transformer import Transformer
    from omnilm.tokenizer import train_bpe

    words = ["the", "a", "model", "learns", "facts", "about", "people", "born", "in", "cities", "and", "works",
             "for", "companies"]
    tokenizer = train_bpe([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                                   pad_token_id=tokenizer.pad_id, max_seq_len=256))
    return save_pretrained(model, folder, tokenizer=tokenizer)


def prompt_messages(count: int) -> list[list[dict[str, str]]]:
    """The chat requests both the server and the peer answer, cycled through in order."""
    return [[{"role": "user", "content": f"Tell me about person {i}"}] for i in range(count)]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------------------------------------
# the server


def start_server(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    """Start ``omnilm serve`` on a free loopback port and wait until it accepts connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "omnilm.cli", "serve", "--model", str(model), "--port", str(port)]
    if args.max_batch is not None:
        argv += ["--max-batch", str(args.max_batch)]
    if args.kv_budget_mb is not None:
        argv += ["--kv-budget-mb", str(args.kv_budget_mb)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(proc.stderr.read().decode()) from None
            time.sleep(0.2)


@dataclass
class LoadResult:
    """What the clients of one server run saw."""

    requests: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def stream_request(port: int, messages: list[dict[str, str]], max_tokens: int, result: LoadResult) -> None:
    """One streaming chat completion; its token count, TTFT and inter-token gaps go into ``result``."""
    body = json.dumps({"messages": messages, "stream": True, "temperature": 0, "max_tokens": max_tokens,
                       "stream_options": {"include_usage": True}})
    began = time.perf_counter()
    ttft, itl, tokens = None, [], 0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        last = began
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]  # the engine never counts the EOS token
            if chunk["choices"] and chunk["choices"][0].get("delta", {}).get("content"):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - began
                else:
                    itl.append(now - last)
                last = now
        conn.close()
    except Exception as err:  # any failure counts as an error of the run
        with result.lock:
            result.errors.append(repr(err))
        return
    with result.lock:
        result.requests += 1
        result.tokens += tokens
        result.itl += itl
        if ttft is not None:
            result.ttft.append(ttft)


def client_loop(port: int, prompts: Sequence[list[dict[str, str]]], max_tokens: int, stop_at: float,
                result: LoadResult, index: int, stride: int, max_requests: int | None = None) -> None:
    """Send requests back to back until ``stop_at`` (or ``max_requests``): prompts index, index + stride, ..."""
    sent = 0
    while time.perf_counter() < stop_at and (max_requests is None or sent < max_requests):
        stream_request(port, prompts[(index + sent * stride) % len(prompts)], max_tokens, result)
        sent += 1


def server_run(port: int, prompts: Sequence[list[dict[str, str]]], args: argparse.Namespace, seconds: float,
               max_requests: int | None = None) -> LoadResult:
    """``args.clients`` concurrent clients for ``seconds``; the time runs until the last answer is in."""
    result = LoadResult()
    began = time.perf_counter()
    stop_at = began + seconds
    threads = [threading.Thread(target=client_loop,
                                args=(port, prompts, args.max_tokens, stop_at, result, i, args.clients, max_requests))
               for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - began
    return result


# ---------------------------------------------------------------------------------------------
# the peer


class Peer:
    """transformers ``generate`` on left-padded batches of the server's prompts, same weights."""

    def __init__(self, model_dir: Path, prompts: Sequence[list[dict[str, str]]], max_tokens: int) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from omnilm.tokenizer import Tokenizer
        from omnilm.tokenizer.chat import IM_END, encode_chat

        hf_logging.disable_progress_bar()
        tokenizer = Tokenizer.from_dir(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.ids = [encode_chat(tokenizer, messages, add_generation_prompt=True)[0] for messages in prompts]
        # The server stops on the same set: the tokenizer's and the model's EOS and <|im_end|>.
        stops = {tokenizer.token_to_id(IM_END), tokenizer.eos_id, self.model.config.eos_token_id}
        self.stops = sorted(t for t in stops if t is not None)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else self.stops[0]
        self.max_tokens = max_tokens
        self.next = 0

    def batch(self, size: int) -> tuple[int, int]:
        """Generate for the next ``size`` prompts: (counted tokens, rows)."""
        rows = [self.ids[(self.next + i) % len(self.ids)] for i in range(size)]
        self.next = (self.next + size) % len(self.ids)
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=self.max_tokens, eos_token_id=self.stops,
                                      pad_token_id=self.pad_id)
        return sum(counted_tokens(row, self.stops) for row in out[:, width:].tolist()), size

    def measure(self, size: int, seconds: float) -> tuple[float, float]:
        """(tokens/s, requests/s) at batch ``size``: one warm-up batch, then batches for ``seconds`` (≥ 1)."""
        self.batch(size)
        tokens = rows = 0
        began = time.perf_counter()
        while True:
            t, r = self.batch(size)
            tokens, rows = tokens + t, rows + r
            elapsed = time.perf_counter() - began
            if elapsed >= seconds:
                return tokens / elapsed, rows / elapsed


class EngineAlone:
    """omnilm's engine in this process, without HTTP: ``clients`` requests kept in flight (a finished one is
    replaced at once by the next prompt), the server's settings, the same prompts. It shows what the HTTP/SSE
    path and the clients, which share the CPU with the server, cost."""

    def __init__(self, model_dir: Path, prompts: Sequence[list[dict[str, str]]], max_tokens: int,
                 clients: int) -> None:
        from omnilm.serve.config import ServeConfig
        from omnilm.serve.runner import build_engine
        from omnilm.tokenizer.chat import encode_chat

        self.engine = build_engine(model_dir, ServeConfig())
        self.ids = [encode_chat(self.engine.tokenizer, m, add_generation_prompt=True)[0] for m in prompts]
        self.max_tokens, self.clients, self.next = max_tokens, clients, 0

    def _request(self) -> Any:
        from omnilm.infer.sampling import SamplingParams
        from omnilm.serve.engine import Request

        ids = self.ids[self.next % len(self.ids)]
        self.next += 1
        return self.engine.submit(Request(ids, SamplingParams(max_new_tokens=self.max_tokens, temperature=0)))

    def measure(self, seconds: float) -> tuple[float, float]:
        """(tokens/s, requests/s) over ``seconds`` of closed-loop load."""
        live = [self._request() for _ in range(self.clients)]
        tokens = finished = 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            self.engine.step()
            for index, request in enumerate(live):
                if request.done.is_set():
                    tokens, finished = tokens + len(request.output_ids), finished + 1
                    live[index] = self._request()
        elapsed = time.perf_counter() - began
        self.engine.fail(live, None)
        return tokens / elapsed, finished / elapsed


def counted_tokens(generated: Sequence[int], stops: Sequence[int]) -> int:
    """Generated tokens before the first stop token (the stop token and padding after it are not counted)."""
    return next((i for i, token in enumerate(generated) if token in stops), len(generated))


# ---------------------------------------------------------------------------------------------
# report


def summary(values: Sequence[float], fmt: str = ".1f") -> str:
    """``median (min–max)`` of the runs' values."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def report(args: argparse.Namespace, runs: Sequence[LoadResult], peer: dict[int, list[tuple[float, float]]],
           alone: Sequence[tuple[float, float]]) -> str:
    ms = 1000.0
    server_tps = [r.tokens / r.seconds for r in runs]
    best = max(peer, key=lambda b: statistics.median(tps for tps, _ in peer[b]))
    best_tps = [tps for tps, _ in peer[best]]
    errors = [e for r in runs for e in r.errors]
    lines = [
        f"# omnilm serve under load vs transformers generate (batched), {args.max_tokens} max new tokens per "
        f"request, greedy, {args.prompts} chat prompts",
        "",
        f"- Every figure is the median of {args.repeats} interleaved run{'s' if args.repeats > 1 else ''} "
        "(server, peer, server, peer, ...), min–max in brackets.",
        f"- Server: {args.clients} streaming clients for {args.seconds:g} s per run, after a warm-up; its figures "
        "include HTTP/SSE overhead.",
        f"- Peer: per batch size and run, 1 warm-up batch, then {args.peer_seconds:g} s of batches.",
        "- Tokens counted, for both: generated tokens before the end-of-sequence token (which is not counted).",
        f"- torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs.",
        "",
        "| system | generated tokens/s | requests/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|",
        f"| omnilm serve, {args.clients} clients (HTTP/SSE) | {summary(server_tps)} | "
        f"{summary([r.requests / r.seconds for r in runs], '.2f')} | "
        f"{statistics.median(percentile(r.ttft, 0.5) for r in runs) * ms:.0f} / "
        f"{statistics.median(percentile(r.ttft, 0.99) for r in runs) * ms:.0f} | "
        f"{statistics.median(percentile(r.itl, 0.5) for r in runs) * ms:.0f} / "
        f"{statistics.median(percentile(r.itl, 0.99) for r in runs) * ms:.0f} | {len(errors)} |",
    ]
    lines.append(f"| omnilm engine in-process, {args.clients} in flight (no HTTP) | "
                 f"{summary([tps for tps, _ in alone])} | {summary([rps for _, rps in alone], '.2f')} | – | – | – |")
    for size, values in peer.items():
        mark = " (best)" if size == best else ""
        lines.append(f"| transformers generate, batch {size}{mark} | {summary([tps for tps, _ in values])} | "
                     f"{summary([rps for _, rps in values], '.2f')} | – | – | – |")
    paired = [s / p for s, p in zip(server_tps, best_tps, strict=True)]
    lines += ["", f"ratio omnilm serve / transformers generate batch {best}: "
              f"{statistics.median(server_tps) / statistics.median(best_tps):.2f}x tokens/s (medians; per-run "
              f"ratios {min(paired):.2f}x–{max(paired):.2f}x)"]
    if errors:
        lines.append(f"errors: {statistics.multimode(errors)[:3]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = prompt_messages(args.prompts)
    runs: list[LoadResult] = []
    peer_runs: dict[int, list[tuple[float, float]]] = {size: [] for size in args.batch_sizes}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else random_model(Path(tmp) / "model")
        peer = Peer(model_dir, prompts, args.max_tokens)
        engine = EngineAlone(model_dir, prompts, args.max_tokens, args.clients)
        engine.measure(1.0)  # warm-up
        alone: list[tuple[float, float]] = []
        proc, port = start_server(model_dir, args)
        try:
            server_run(port, prompts, args, seconds=float("inf"), max_requests=1)  # warm-up, untimed
            for repeat in range(args.repeats):
                runs.append(server_run(port, prompts, args, args.seconds))
                for size in args.batch_sizes:
                    peer_runs[size].append(peer.measure(size, args.peer_seconds))
                alone.append(engine.measure(args.peer_seconds))
                print(f"  run {repeat + 1}/{args.repeats}: server {runs[-1].tokens / runs[-1].seconds:.1f} tok/s, "
                      + ", ".join(f"batch {s} {v[-1][0]:.1f} tok/s" for s, v in peer_runs.items()), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print()
    print(report(args, runs, peer_runs, alone))


if __name__ == "__main__":
    main()
