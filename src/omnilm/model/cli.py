"""CLI verbs ``init`` (a randomly initialised model folder) and ``info`` (what a model folder holds)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("init", help="write a randomly initialised model folder from a preset or config",
                              description="Create a model folder (HF layout) with random weights.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="model preset name (see `omnilm info --presets`)")
    source.add_argument("--config", help="model config file (YAML/JSON); may name a `preset` to start from")
    p.add_argument("--tokenizer", help="folder with tokenizer.json to copy in (sets vocab size and special ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(handler=run_init)

    p = subparsers.add_parser("info", help="describe a model folder or list the presets")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model folder")
    what.add_argument("--presets", action="store_true", help="list the named presets")
    p.set_defaults(handler=run_info)


def run_init(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from omnilm.model import Transformer, get_preset, load_model_config
    from omnilm.model.hf import save_pretrained
    from omnilm.tokenizer import Tokenizer

    config = get_preset(args.preset) if args.preset else load_model_config(args.config)
    tokenizer = None
    if args.tokenizer:
        tokenizer = Tokenizer.from_dir(args.tokenizer)
        config = replace(config, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                         bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out}: {config.family}, {model.num_params() / 1e6:.2f}M parameters")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import torch

    from omnilm.model import PRESETS, Transformer
    from omnilm.model.hf import read_config

    configs = dict(PRESETS) if args.presets else {args.model: read_config(args.model)}
    for name, config in configs.items():
        with torch.device("meta"):
            n = Transformer(config).num_params()
        print(f"{name}: {config.family}, {n / 1e6:.2f}M params, {config.n_layer} layers, d_model {config.d_model}, "
              f"{config.n_head} heads / {config.kv_heads} KV heads, vocab {config.vocab_size}, "
              f"context {config.max_seq_len}, tied={config.tie_embeddings}")
    return 0
