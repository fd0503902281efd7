"""Training throughput and peak memory: omnilm versus transformers ``LlamaForCausalLM``, same config.

What is measured
    Both models are built from the same Llama-family config with the same seeded weights (omnilm's weights are
    written with ``save_pretrained`` and loaded by transformers). Each runs the same plain PyTorch loop: forward,
    cross-entropy on next tokens, backward, AdamW step, zero_grad — on identical random batches. Timing:
    ``--warmup`` steps untimed, then ``--steps`` timed.

    omnilm runs in up to three variants (``--variants``): ``omnilm`` (the decoder scores its own logits, all at
    once, as transformers does), ``omnilm-chunked`` (``train.loss_chunk_tokens``: the loss chunk by chunk over
    ``--loss-chunk-tokens`` tokens, so the (tokens × vocab) logits never exist whole) and ``omnilm-lean``
    (chunked loss plus ``train.activation_checkpointing``: blocks recomputed in backward). Each is compared with
    transformers against the issue's targets: ≥ 1.3× its tokens/s, ≤ 0.7× its peak memory.

    Each run is its own child process, and the runs are interleaved: omnilm, transformers, omnilm,
    transformers, ... ``--repeats`` (default 3) of each. Reported per implementation: median tokens/s with
    min-max over its runs, and median peak memory above the process's baseline: the baseline is taken in the
    child after its imports (torch, omnilm, transformers), before the model is loaded; the peak covers
    loading, warm-up and timed steps (CPU: max RSS (``ru_maxrss``) minus the baseline RSS (``/proc/self/statm``);
    GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated at the baseline). The losses of the
    first steps are compared across implementations: in fp32 they must agree within 1e-4 (else the script
    fails); in bfloat16 the largest difference is reported (tolerance 2e-2).

    On a GPU the script also reports MFU: tokens/s · 6·(non-embedding params + attention) / peak bf16 FLOP/s.

How to run
    .venv/bin/python benchmarks/train_step.py                    # llama-tiny shape, batch 8 x 256, fp32 CPU
    .venv/bin/python benchmarks/train_step.py --preset qwen2.5-0.5b --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/train_step.py --steps 2 --warmup 1 --batch-size 2 --seq-len 32  # smoke run
    .venv/bin/python benchmarks/train_step.py --preset qwen2.5-0.5b --batch-size 4 --seq-len 64 --steps 2 \
        --warmup 1 --repeats 2                                  # the 150k-vocabulary shape, short sequence
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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

#: omnilm variants: (train.loss_chunk_tokens on, train.activation_checkpointing).
OMNILM_VARIANTS = {"omnilm": (False, False), "omnilm-chunked": (True, False), "omnilm-lean": (True, True)}
IMPLS = (*OMNILM_VARIANTS, "transformers")
#: The issue's targets for omnilm against transformers.
TARGET_SPEEDUP, TARGET_MEMORY = 1.3, 0.7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-tiny", help="omnilm model preset (llama or qwen2 family)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="child processes per implementation, interleaved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 = autocast around forward and loss (weights and optimizer stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--variants", default=",".join(IMPLS),
                   help=f"comma-separated implementations to run, among {', '.join(IMPLS)} (transformers always)")
    p.add_argument("--loss-chunk-tokens", type=int, default=1024,
                   help="tokens per chunk of the loss in the chunked omnilm variants")
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.loss_chunk_tokens < 1:
        p.error("--repeats, --steps and --loss-chunk-tokens must be at least 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(IMPLS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose among {list(IMPLS)}")
    args.variants = [impl for impl in IMPLS if impl in variants or impl == "transformers"]
    return args


def flops_per_token(model: torch.nn.Module, config, seq_len: int) -> float:  # noqa: ANN001
    params = sum(p.numel() for n, p in model.named_parameters() if "emb" not in n and "embed" not in n)
    return 6.0 * params + 12.0 * config.n_layer * config.n_head * config.dim_per_head * seq_len


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux ``/proc/self/statm``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident memory of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def child(args: argparse.Namespace) -> None:
    """Build one implementation, train, print a JSON line."""
    from omnilm.model.hf import load_pretrained

    if args.impl == "transformers":
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        # transformers imports a model's module lazily: load it now so that it belongs to the baseline.
        getattr(transformers, AutoConfig.from_pretrained(args.folder).architectures[0])

    device = torch.device(args.device)
    # Baseline after imports, before the model exists: memory is reported as the peak above it.
    baseline_mib = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else current_rss_mib()
    if args.impl in OMNILM_VARIANTS:
        model = load_pretrained(args.folder, dtype=torch.float32).to(device)
        chunked, recompute = OMNILM_VARIANTS[args.impl]
        model.set_memory_options(args.loss_chunk_tokens if chunked else 0, recompute)
    else:
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
            if args.impl in OMNILM_VARIANTS:  # the training objectives' path: the decoder scores its targets
                loss = step_fn(tokens[:, :-1], targets=tokens[:, 1:])
            else:
                loss = F.cross_entropy(step_fn(tokens[:, :-1]).logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    tokens_per_s = args.steps * args.batch_size * args.seq_len / seconds
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((f for k, f in PEAK_FLOPS.items() if k in name), None)
        if peak:
            mfu = tokens_per_s * flops_per_token(model, config, args.seq_len) / peak
    print(json.dumps({"impl": args.impl, "tokens_per_s": tokens_per_s, "memory_mib": peak_mib - baseline_mib,
                      "baseline_mib": baseline_mib, "mfu": mfu, "first_losses": losses[:3]}))


def run_child(args: argparse.Namespace, impl: str, folder: str) -> dict:
    argv = [sys.executable, __file__, "--impl", impl, "--folder", folder, "--preset", args.preset,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--device", args.device, "--dtype", args.dtype,
            "--loss-chunk-tokens", str(args.loss_chunk_tokens)]
    if args.compile:
        argv.append("--compile")
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {impl} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float], fmt: str = ",.0f") -> str:
    """``median (min–max)`` of the runs' values."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.impl:
        child(args)
        return
    config = get_preset(args.preset)
    if config.family == "gpt2":
        sys.exit("the peer is LlamaForCausalLM: pick a llama or qwen2 preset")
    runs: dict[str, list[dict]] = {impl: [] for impl in args.variants}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        save_pretrained(Transformer(config), folder)
        for repeat in range(args.repeats):
            for impl in args.variants:  # interleaved: A B C A B C ...
                runs[impl].append(run_child(args, impl, folder))
            print(f"  run {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{impl} {r[-1]['tokens_per_s']:,.0f} tokens/s" for impl, r in runs.items()), flush=True)
    median = {impl: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "memory_mib")}
              for impl, rs in runs.items()}
    plural = "s" if args.repeats > 1 else ""
    print(f"\n# Training step: omnilm vs transformers ({args.preset}, batch {args.batch_size} x {args.seq_len}, "
          f"{args.dtype}, {args.device}{', compiled' if args.compile else ''})\n")
    print(f"Every figure is the median of {args.repeats} run{plural} per implementation, each in its own process, "
          f"interleaved ({', '.join(args.variants)}, ...); min–max in brackets. {args.warmup} warm-up + "
          f"{args.steps} timed steps per run. Memory: peak above the process's baseline after imports "
          f"({'max_memory_allocated' if args.device.startswith('cuda') else 'max RSS'}).\n")
    theirs = median["transformers"]
    print("| implementation | tokens/s | peak memory above baseline (MiB) | tokens/s ÷ transformers | "
          "memory ÷ transformers | MFU | first losses |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for impl, rs in runs.items():
        mfus = [r["mfu"] for r in rs if r["mfu"] is not None]
        mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a"
        losses = ", ".join(f"{x:.4f}" for x in rs[0]["first_losses"])
        speed = median[impl]["tokens_per_s"] / theirs["tokens_per_s"]
        memory = median[impl]["memory_mib"] / theirs["memory_mib"]
        print(f"| {impl} | {summary([r['tokens_per_s'] for r in rs])} | {summary([r['memory_mib'] for r in rs])} | "
              f"{speed:.2f}x | {memory:.2f}x | {mfu} | {losses} |")
    print(f"\ntargets (issue 17): tokens/s >= {TARGET_SPEEDUP}x transformers; peak memory <= {TARGET_MEMORY}x on the "
          f"qwen2.5-0.5b shape")
    for impl in runs:
        if impl == "transformers":
            continue
        speed = median[impl]["tokens_per_s"] / theirs["tokens_per_s"]
        memory = median[impl]["memory_mib"] / theirs["memory_mib"]
        print(f"  {impl}: {speed:.2f}x tokens/s ({'met' if speed >= TARGET_SPEEDUP else 'not met'}), "
              f"{memory:.2f}x peak memory ({'met' if memory <= TARGET_MEMORY else 'not met'})")
    tolerance = 1e-4 if args.dtype == "float32" else 2e-2
    gap = max(abs(a - b) for impl in runs if impl != "transformers"
              for ro, rt in zip(runs[impl], runs["transformers"], strict=True)
              for a, b in zip(ro["first_losses"], rt["first_losses"], strict=True))
    verdict = "identical within tolerance" if gap <= tolerance else "DIFFERENT"
    print(f"first losses, every run: max |omnilm - transformers| = {gap:.2e} ({verdict}, tolerance {tolerance:g})")
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    if gap > tolerance and args.dtype == "float32":
        sys.exit("the two implementations do not compute the same losses: the comparison is not like with like")


if __name__ == "__main__":
    main()
