"""CLI verb ``export``: ``omnilm export gguf`` writes a model folder as a llama.cpp GGUF file."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a model folder in another runtime's format")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="a GGUF file for llama.cpp / ollama (gpt2, llama and qwen2 families)",
                           description="Write the model and its tokenizer (merges, special tokens, chat template) "
                                       "as one GGUF file; q8_0 and q4_0 use llama.cpp's block layouts.")
    g.add_argument("--model", required=True, help="model folder (HF layout, with tokenizer.json)")
    g.add_argument("--out", required=True, help="output .gguf file")
    g.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="weight precision (norms and biases stay f32; q4_0 keeps embedding and head in q8_0)")
    g.set_defaults(handler=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnilm.export.gguf import export_gguf
    from omnilm.model.hf import load_pretrained
    from omnilm.tokenizer import Tokenizer

    model = load_pretrained(args.model)
    out = export_gguf(model, Tokenizer.from_dir(args.model), args.out, args.type, name=Path(args.model).name)
    print(f"wrote {out} ({args.type}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0
