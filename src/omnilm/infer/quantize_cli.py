"""CLI verb ``quantize``: write a weight-only quantized copy of a model folder and report what it costs."""

from __future__ import annotations

import argparse
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a model's linear layers (int8 per channel or int4 group-wise)",
        description="Write a copy of --model whose linear layers (all but the LM head) hold int8 per-output-"
                    "channel or int4 group-wise weights, dequantised on the fly. Prints the weight files' size "
                    "before and after and, with --eval-data, the validation loss and perplexity before and after.")
    p.add_argument("--model", required=True, help="model folder to quantize")
    p.add_argument("--bits", type=int, choices=(4, 8), required=True)
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128,
                   help="input features per int4 scale (default 128; ignored for 8 bits)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--quantize-head", action="store_true",
                   help="quantize the LM head too (a tied head becomes a quantized copy): faster decoding, "
                        "a little more error")
    p.add_argument("--eval-data", help="tokenised dataset folder with a 'val' split to measure perplexity on")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=256, help="capped at the model's context")
    p.set_defaults(handler=run_quantize)


def _val_loss(model, tokenizer, args: argparse.Namespace) -> float:  # noqa: ANN001 - Transformer, Tokenizer
    from omnilm.eval.suite import val_loss_eval

    # A fixed seed draws the same batches for the model before and after quantization.
    spec = {"data": args.eval_data, "seq_len": args.eval_seq_len, "batch_size": args.eval_batch_size,
            "batches": args.eval_batches, "seed": 1}
    return val_loss_eval(model, tokenizer, spec)["val_loss"]


def run_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnilm.infer.quantize import quantize_model
    from omnilm.infer.quantized_checkpoint import safetensors_bytes, save_quantized
    from omnilm.model.hf import load_pretrained
    from omnilm.tokenizer import Tokenizer

    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError("--out must differ from --model (the original weights are needed for comparison)")
    model = load_pretrained(args.model, dtype=None)
    tokenizer = Tokenizer.from_dir(args.model) if (Path(args.model) / "tokenizer.json").is_file() else None
    if args.eval_data and tokenizer is None:
        raise ValueError(f"--eval-data needs the tokenizer of {args.model} (tokenizer.json)")
    before = _val_loss(model, tokenizer, args) if args.eval_data else None
    quantize_model(model, args.bits, args.group_size, skip=() if args.quantize_head else ("lm_head",))
    save_quantized(model, args.out, tokenizer=tokenizer)
    size_in, size_out = safetensors_bytes(args.model), safetensors_bytes(args.out)
    scheme = f"int{args.bits}" + (f" (group size {args.group_size})" if args.bits == 4 else " (per channel)")
    print(f"wrote {args.out}: {len(model.quantization['modules'])} linear layers as {scheme}")
    print(f"size on disk: {size_in / 1e6:.2f} MB -> {size_out / 1e6:.2f} MB ({size_out / size_in:.3f}x)")
    if before is not None:
        after = _val_loss(model, tokenizer, args)
        print(f"val loss: {before:.4f} -> {after:.4f} ({after - before:+.4f}); "
              f"perplexity: {math.exp(before):.3f} -> {math.exp(after):.3f} "
              f"({100 * (math.exp(after - before) - 1):+.2f}%)")
    return 0
