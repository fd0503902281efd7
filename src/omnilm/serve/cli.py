"""CLI verb ``serve``: the OpenAI-compatible server for a model folder."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and a web chat)")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: the folder name)")
    p.add_argument("--kv-budget-mb", type=int, default=256, help="KV-cache memory for concurrent requests")
    p.add_argument("--draft-model", default=None,
                   help="a small model with the same tokenizer: requests are then decoded one at a time with "
                        "speculative decoding (lower latency per stream, no batching)")
    p.add_argument("--speculative-k", type=int, default=4, help="draft tokens proposed per round")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from omnilm.serve.server import Service, create_app

    service = Service(args.model, model_name=args.name, kv_budget_bytes=args.kv_budget_mb << 20,
                      draft_dir=args.draft_model, speculative_k=args.speculative_k)
    print(f"omnilm serve: {service.name} on http://{args.host}:{args.port} "
          f"({service.engine.capacity} concurrent requests, context {service.context})", flush=True)
    uvicorn.run(create_app(service, api_key=args.api_key), host=args.host, port=args.port, log_level="warning")
    return 0
