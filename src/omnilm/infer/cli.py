"""CLI verb ``generate``: continue a prompt with a model folder, streaming to stdout."""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="continue a text prompt (prints only the continuation, streaming)",
        description="Continue --prompt with the model in --model. Only the generated continuation is "
                    "printed to stdout, piece by piece as it is produced.")
    p.add_argument("--model", required=True, help="model folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p × top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = off)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score exponent on length")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop before this string (repeatable); it is not printed")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--draft-model", default=None, metavar="DIR",
                   help="draft model folder (same tokenizer) for speculative decoding: same output distribution, "
                        "greedy output unchanged, sampled output drawn differently for a given --seed")
    p.add_argument("--mtp", action="store_true",
                   help="self-speculative decoding: the model's own multi-token-prediction heads (mtp.safetensors, "
                        "from pretraining with the mtp option) draft; same output distribution as plain decoding")
    p.add_argument("--speculative-k", type=int, default=4, help="draft tokens per target pass (default 4)")
    p.add_argument("--attention-sinks", type=int, default=0, metavar="K",
                   help="stream with constant memory: keep the first K tokens plus --sink-window recent ones in the "
                        "KV cache (StreamingLLM; 0 = full cache)")
    p.add_argument("--sink-window", type=int, default=0, metavar="W",
                   help="recent tokens kept with --attention-sinks (default: the rest of the model's context)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute precision (default: as stored)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from omnilm.errors import UserError
    from omnilm.infer import SamplingParams, TextGenerator
    from omnilm.model.families import SEQ2SEQ_TYPES, model_type

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
        length_penalty=args.length_penalty, stop=tuple(args.stop), seed=args.seed,
        attention_sinks=args.attention_sinks, sink_window=args.sink_window)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if model_type(args.model) in SEQ2SEQ_TYPES:  # an encoder-decoder: --prompt is the encoder input
        from omnilm.infer.seq2seq import generate_text

        if args.draft_model:
            raise UserError("--draft-model works with decoder-only models")
        out = sys.stdout.buffer
        for piece in generate_text(args.model, args.prompt, params, args.device, dtype):
            out.write(piece.encode("utf-8"))
            out.flush()
        if sys.stdout.isatty():
            out.write(b"\n")
        return 0
    generator = TextGenerator.from_pretrained(args.model, dtype=dtype, device=args.device, draft=args.draft_model,
                                              speculative_k=args.speculative_k, mtp=args.mtp)
    out = sys.stdout.buffer
    for piece in generator.stream(args.prompt, params):
        out.write(piece.encode("utf-8"))
        out.flush()
    if sys.stdout.isatty():
        out.write(b"\n")
    return 0
