"""CLI verbs ``init`` (a randomly initialised model folder), ``info`` (what a model folder holds), ``upcycle``
(dense to mixture of experts) and ``grow`` (deeper or wider)."""

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

    p = subparsers.add_parser(
        "upcycle", help="turn a dense llama/qwen2 model folder into a mixture of experts (same first forward)",
        description="Every expert a copy of the dense MLP, or with --granularity G one of its G hidden-unit "
                    "slices (scaled by G); the router starts so that the MoE computes the dense function.")
    p.add_argument("--model", required=True, help="dense model folder")
    p.add_argument("--experts", type=int, required=True, help="routed experts per layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (a multiple of the granularity)")
    p.add_argument("--granularity", type=int, default=1, help="split the MLP into this many finer experts")
    p.add_argument("--seed", type=int, default=0, help="seed of the router's random rows")
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(handler=run_upcycle)

    p = subparsers.add_parser(
        "grow", help="make a model folder deeper (layer copies) or wider, optionally preserving its function",
        description="--depth interleave|stack duplicates the layers (with --preserve the copies start with zero "
                    "output projections, so the logits are unchanged); --d-model / --d-ff widen the model "
                    "function-preservingly.")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--depth", choices=("interleave", "stack"), help="depth up-scaling mode")
    p.add_argument("--overlap", type=int, default=0, help="stack: layers dropped at the seam of each half")
    p.add_argument("--preserve", action=argparse.BooleanOptionalAction, default=True,
                   help="depth: zero the copies' output projections (default on)")
    p.add_argument("--d-model", type=int, help="new residual width (llama/qwen2)")
    p.add_argument("--d-ff", type=int, help="new MLP hidden width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(handler=run_grow)

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
    from omnilm.model.families import ENCODER_TYPES, SEQ2SEQ_TYPES, family_presets, fresh_model, load_any, model_type
    from omnilm.model.hf import read_config
    from omnilm.model.moe import active_params

    if args.model and model_type(args.model) in ENCODER_TYPES + SEQ2SEQ_TYPES:
        model = load_any(args.model)
        _print_family_model(args.model, model.config, sum(p.numel() for p in model.parameters()))
        return 0
    if args.presets:  # the encoder and encoder-decoder families first
        for family, presets in family_presets().items():
            for name, config in presets.items():
                with torch.device("meta"):
                    model = fresh_model({"family": family, "preset": name})
                _print_family_model(f"{name} [{family}]", config, sum(p.numel() for p in model.parameters()))
    configs = dict(PRESETS) if args.presets else {args.model: read_config(args.model)}
    for name, config in configs.items():
        with torch.device("meta"):
            n = Transformer(config).num_params()
        experts = ""
        if config.n_experts:
            with torch.device("meta"):
                active = active_params(Transformer(config), include_embeddings=True)
            experts = (f", {config.n_experts} experts (top-{config.n_experts_per_tok}"
                       f"{f', {config.n_shared_experts} shared' if config.n_shared_experts else ''}), "
                       f"{active / 1e6:.2f}M active")
        print(f"{name}: {config.family}, {n / 1e6:.2f}M params, {config.n_layer} layers, d_model {config.d_model}, "
              f"{config.n_head} heads / {config.kv_heads} KV heads, vocab {config.vocab_size}, "
              f"context {config.max_seq_len}, tied={config.tie_embeddings}{experts}")
    return 0


def _print_family_model(name: str, config: object, params: int) -> None:
    """One line for an encoder or encoder-decoder config (their fields differ from the decoder's)."""
    c = config
    layers = f"{c.n_layer} layers" if not hasattr(c, "decoder_layers") else \
        f"{c.n_layer}+{c.decoder_layers} encoder+decoder layers"
    extra = f", ff {c.ff_kind}, tied={c.tie_embeddings}" if hasattr(c, "ff_kind") else ""
    print(f"{name}: {params / 1e6:.2f}M params, {layers}, d_model {c.d_model}, {c.n_head} heads, "
          f"vocab {c.vocab_size}, context {c.max_seq_len}{extra}")


def run_upcycle(args: argparse.Namespace) -> int:
    from omnilm.model.grow_folder import grow_folder

    summary = grow_folder(args.model, args.out, "upcycle", experts=args.experts, top_k=args.top_k,
                          granularity=args.granularity, seed=args.seed)
    _print_growth(args.out, summary)
    return 0


def run_grow(args: argparse.Namespace) -> int:
    from omnilm.errors import UserError
    from omnilm.model.grow_folder import grow_folder

    if (args.depth is None) == (args.d_model is None and args.d_ff is None):
        raise UserError("grow: give either --depth or --d-model/--d-ff")
    if args.depth:
        summary = grow_folder(args.model, args.out, "depth", mode=args.depth, overlap=args.overlap,
                              preserve=args.preserve)
    else:
        summary = grow_folder(args.model, args.out, "width", d_model=args.d_model, d_ff=args.d_ff, seed=args.seed)
    _print_growth(args.out, summary)
    return 0


def _print_growth(out: str, summary: dict) -> None:
    print(f"wrote {out}: {summary['params_before'] / 1e6:.2f}M -> {summary['params_after'] / 1e6:.2f}M parameters, "
          f"{summary['n_layer']} layers, d_model {summary['d_model']}, experts {summary['n_experts']}; "
          f"max |logit change| on a random batch {summary['max_logit_change']:.2e}")
