"""Training throughput and peak memory: omnilm versus transformers ``LlamaForCausalLM``, same config.

What is measured
    Both models are built from the same Llama-family config with the same seeded weights (omnilm's weights are
    written with ``save_pretrained`` and loaded by transformers). Each runs the same plain PyTorch loop: forward,
    cross-entropy on next tokens, backward, AdamW step, zero_grad — on identical random batches. Timing:
    ``--warmup`` steps untimed, then ``--steps`` timed. Each implementation runs in its own child process so
    that peak memory (max RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is its own; both children are
    started by the same invocation, one after the other, and the losses of the first steps are compared.

    On a GPU the script also reports MFU: tokens/s · 6·(non-embedding params + attention) / peak bf16 FLOP/s.

How to run
    .venv/bin/python benchmarks/train_step.py                    # llama-tiny shape, batch 8 x 256, fp32 CPU
    .venv/bin/python benchmarks/train_step.py --preset gpt2-124m --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from omnilm.model.config import get_preset
from omnilm.model.hf import save_pretrained
from omnilm.model.transformer import Transformer
from omnilm.train.trainer import PEAK_FLOPS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-tiny", help="omnilm model preset (llama or qwen2 family)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 = autocast around forward and loss (weights and optimizer stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--impl", choices=["omnilm", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def flops_per_token(model: torch.nn.Module, config, seq_len: int) -> float:  # noqa: ANN001
    params = sum(p.numel() for n, p in model.named_parameters() if "emb" not in n and "embed" not in n)
    return 6.0 * params + 12.0 * config.n_layer * config.n_head * config.dim_per_head * seq_len


def child(args: argparse.Namespace) -> None:
    """Build one implementation, train, print a JSON line."""
    from omnilm.model.hf import load_pretrained

    device = torch.device(args.device)
    if args.impl == "omnilm":
        model = load_pretrained(args.folder, dtype=torch.float32).to(device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32,
                                                     attn_implementation="sdpa").to(device)
    config = get_preset(args.preset)
    model.train()
    step_fn = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
               for _ in range(4)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    losses = []

    def step(i: int) -> None:
        tokens = batches[i % len(batches)].to(device)
        with amp:
            out = step_fn(tokens[:, :-1])
            logits = out if isinstance(out, torch.Tensor) else out.logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    tokens_per_s = args.steps * args.batch_size * args.seq_len / seconds
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((f for k, f in PEAK_FLOPS.items() if k in name), None)
        if peak:
            mfu = tokens_per_s * flops_per_token(model, config, args.seq_len) / peak
    print(json.dumps({"impl": args.impl, "tokens_per_s": tokens_per_s, "peak_mib": peak_mib, "mfu": mfu,
                      "first_losses": losses[:3]}))


def run_child(args: argparse.Namespace, impl: str, folder: str) -> dict:
    argv = [sys.executable, __file__, "--impl", impl, "--folder", folder, "--preset", args.preset,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--device", args.device, "--dtype", args.dtype]
    if args.compile:
        argv.append("--compile")
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.impl:
        child(args)
        return
    config = get_preset(args.preset)
    if config.family == "gpt2":
        sys.exit("the peer is LlamaForCausalLM: pick a llama or qwen2 preset")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        save_pretrained(Transformer(config), folder)
        results = {impl: run_child(args, impl, folder) for impl in ("omnilm", "transformers")}
    ours, theirs = results["omnilm"], results["transformers"]
    print(f"\n# Training step: omnilm vs transformers ({args.preset}, batch {args.batch_size} x {args.seq_len}, "
          f"{args.dtype}, {args.device}{', compiled' if args.compile else ''})\n")
    print("| implementation | tokens/s | peak memory (MiB) | MFU | first losses |")
    print("|---|---:|---:|---:|---|")
    for impl, r in results.items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        losses = ", ".join(f"{x:.4f}" for x in r["first_losses"])
        print(f"| {impl} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} | {mfu} | {losses} |")
    print(f"\nratio omnilm/transformers: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s, "
          f"{ours['peak_mib'] / theirs['peak_mib']:.2f}x peak memory")
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
