"""CLI verb ``serve``: the OpenAI-compatible server for a model folder."""

from __future__ import annotations

import argparse
import os

API_KEY_ENV = "OMNILM_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    from omnilm.serve.config import ServeConfig

    defaults = ServeConfig()
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (and a web chat)")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ routes (default: the {API_KEY_ENV} environment "
                        "variable, which keeps the key out of the process list)")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: the folder name)")
    p.add_argument("--kv-budget-mb", type=int, default=defaults.kv_budget_mb,
                   help="memory of the paged KV cache shared by all running requests (MiB)")
    p.add_argument("--block-size", type=int, default=defaults.block_size, help="positions per KV block")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch, help="most requests decoded together")
    p.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk,
                   help="most prompt tokens prefilled per step (long prompts are prefilled in chunks)")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="most requests waiting to start; beyond it the answer is 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                   help="seconds after which an unfinished request is cancelled (504)")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="largest request body")
    p.add_argument("--engine-thread", action="store_true",
                   help="run the engine in a thread of the server process instead of a process of its own")
    p.add_argument("--draft-model", default=None,
                   help="a small model with the same tokenizer: requests are then decoded one at a time with "
                        "speculative decoding (lower latency per stream, no batching)")
    p.add_argument("--mtp", action="store_true",
                   help="self-speculative decoding with the model's own multi-token-prediction heads (one request "
                        "at a time, no second model)")
    p.add_argument("--speculative-k", type=int, default=defaults.speculative_k, help="draft tokens proposed per round")
    p.add_argument("--rag", default=None, metavar="DIR",
                   help="a retrieval index (omnilm rag index): chat requests get the top passages for their last "
                        "user turn")
    p.add_argument("--top-k", dest="rag_top_k", type=int, default=defaults.rag_top_k,
                   help="passages retrieved per chat request with --rag")
    p.add_argument("--attention-sinks", type=int, default=defaults.attention_sinks, metavar="K",
                   help="stream every request with constant memory: keep its first K tokens plus --sink-window "
                        "recent ones, so replies may run past the context (requests may set attention_sinks)")
    p.add_argument("--sink-window", type=int, default=defaults.sink_window, metavar="W",
                   help="recent tokens kept with --attention-sinks (default: the rest of the context)")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from omnilm.serve.config import ServeConfig
    from omnilm.serve.server import Service, create_app

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(kv_budget_mb=args.kv_budget_mb, block_size=args.block_size, max_batch=args.max_batch,
                         prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
                         request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                         draft_model=args.draft_model, mtp=args.mtp, speculative_k=args.speculative_k, rag=args.rag,
                         rag_top_k=args.rag_top_k, attention_sinks=args.attention_sinks,
                         sink_window=args.sink_window,
                         engine_process=not args.engine_thread)
    service = Service(args.model, model_name=args.name, config=config)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    stats = service.runner.stats()
    capacity = (f"{stats['kv_blocks']} KV blocks of {stats['block_size']} positions, up to {config.max_batch} "
                "requests at once" if "kv_blocks" in stats
                else "one request at a time" + (", speculative" if config.draft_model or config.mtp else ""))
    voice = f", speaks at {service.voice['sample_rate']} Hz" if service.voice is not None else ""
    print(f"omnilm serve: {service.name} on http://{args.host}:{args.port} ({capacity}, context {service.context}"
          f"{voice}{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(create_app(service, api_key=api_key), host=args.host, port=args.port, log_level="warning")
    return 0
