"""Load test of ``omnilm serve``: concurrent streaming clients against a local server.

What is measured
    A server process is started on a free loopback port for ``--model`` (default: a small random Llama with
    the demo's shape written to a temporary folder; pass ``--model runs/demo/final`` for the demo's model).
    ``--clients`` threads (default 32) each send streaming chat completions back to back for ``--seconds``
    (greedy, ``--max-tokens`` new tokens, prompts of a few words). Reported: completed requests/s, generated
    tokens/s (usage counts), time to first token (p50/p99), inter-token latency (p50/p99, time between streamed
    chunks), and errors (must be 0).

    Peer: the same prompts answered one after another by transformers ``generate`` (greedy, same max tokens,
    same weights loaded from the folder) in this process, for ``--seconds``: its tokens/s is the sequential
    baseline the server's aggregate throughput is compared with.

How to run
    .venv/bin/python benchmarks/serve_load.py                          # 32 clients, 20 s
    .venv/bin/python benchmarks/serve_load.py --clients 8 --seconds 10 --model runs/demo/final
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: a random demo-shaped model)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    return p.parse_args()


def random_model(folder: Path) -> Path:
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


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(model: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "omnilm.cli", "serve", "--model", str(model), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(proc.stderr.read().decode()) from None
            time.sleep(0.2)


def client_loop(port: int, args: argparse.Namespace, stop_at: float, results: dict, index: int) -> None:
    import http.client

    while time.perf_counter() < stop_at:
        body = json.dumps({"messages": [{"role": "user", "content": f"Tell me about person {index}"}],
                           "stream": True, "temperature": 0, "max_tokens": args.max_tokens,
                           "stream_options": {"include_usage": True}})
        began = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            last, first, tokens = began, None, 0
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        results["ttft"].append(now - began)
                    else:
                        results["itl"].append(now - last)
                    last = now
            conn.close()
            results["requests"] += 1
            results["tokens"] += tokens
        except Exception as err:  # any failure counts as an error of the run
            results["errors"].append(repr(err))


def sequential_baseline(model_dir: Path, args: argparse.Namespace) -> float:
    """Generated tokens/s of transformers ``generate``, one request after another, same weights and prompts."""
    from transformers import AutoModelForCausalLM

    from omnilm.tokenizer import Tokenizer
    from omnilm.tokenizer.chat import IM_END, format_chat

    tokenizer = Tokenizer.from_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stops = [t for t in (tokenizer.token_to_id(IM_END), tokenizer.eos_id) if t is not None]
    tokens, began, index = 0, time.perf_counter(), 0
    while time.perf_counter() - began < args.seconds:
        prompt = format_chat([{"role": "user", "content": f"Tell me about person {index}"}], add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=args.max_tokens, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_id)
        tokens += out.shape[1] - ids.shape[1]
        index += 1
    return tokens / (time.perf_counter() - began)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else random_model(Path(tmp) / "model")
        proc, port = start_server(model_dir)
        results: dict = {"requests": 0, "tokens": 0, "ttft": [], "itl": [], "errors": []}
        try:
            began = time.perf_counter()
            stop_at = began + args.seconds
            threads = [threading.Thread(target=client_loop, args=(port, args, stop_at, results, i))
                       for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - began
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        baseline = sequential_baseline(model_dir, args)
    server_tps = results["tokens"] / elapsed
    print(f"\n# omnilm serve under load: {args.clients} streaming clients for {args.seconds:.0f} s, "
          f"{args.max_tokens} new tokens per request, greedy; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| requests/s | generated tokens/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | errors | "
          "sequential transformers tokens/s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ms = 1000.0
    print(f"| {results['requests'] / elapsed:.2f} | {server_tps:.1f} | "
          f"{percentile(results['ttft'], 0.5) * ms:.0f} / {percentile(results['ttft'], 0.99) * ms:.0f} | "
          f"{percentile(results['itl'], 0.5) * ms:.0f} / {percentile(results['itl'], 0.99) * ms:.0f} | "
          f"{len(results['errors'])} | {baseline:.1f} | {server_tps / baseline:.2f}x |")
    if results["errors"]:
        print("errors:", statistics.multimode(results["errors"])[:3])


if __name__ == "__main__":
    main()
