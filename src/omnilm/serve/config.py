"""Settings of ``omnilm serve`` (a light module: the CLI reads its defaults without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs (``omnilm serve`` flags of the same names)."""

    #: Memory for the paged KV cache of all running requests, in MiB (it sets how many requests fit at once).
    kv_budget_mb: int = 256
    #: Positions per KV block (the unit of allocation and of prefix sharing).
    block_size: int = 16
    #: Most requests decoded together.
    max_batch: int = 64
    #: Most prompt tokens prefilled per engine step (long prompts are prefilled in chunks of this size).
    prefill_chunk: int = 256
    #: Most requests waiting to start; beyond it requests are answered 429.
    max_queue: int = 256
    #: Seconds after which an unfinished request is cancelled and answered 504.
    request_timeout_s: float = 600.0
    #: Largest request body in bytes (413 beyond it).
    max_body_bytes: int = 1 << 20
    #: Seconds a client is asked to wait before retrying after a 429.
    retry_after_s: int = 1
    #: Run the engine in a process of its own (True) or in a thread of the server process (False: one interpreter
    #: for both, slower under load, but the model is reachable in-process, as tests need).
    engine_process: bool = True
    #: A smaller model with the same tokenizer: requests are then decoded one at a time, speculatively.
    draft_model: str | None = None
    #: Self-speculative decoding: the model's own multi-token-prediction heads draft (one request at a time).
    mtp: bool = False
    #: Draft tokens proposed per speculative round.
    speculative_k: int = 4
    #: A retrieval index folder (``omnilm rag index``): chat requests get the top passages for their last user
    #: turn put into it (:mod:`omnilm.rag.prompt`).
    rag: str | None = None
    #: Passages retrieved per chat request with ``rag``.
    rag_top_k: int = 3
    #: Attention sinks of every request that does not set its own ``attention_sinks`` (0: none): requests then
    #: stream past the context with constant memory (:mod:`omnilm.serve.engine`).
    attention_sinks: int = 0
    #: Recent tokens kept with attention sinks (0: the rest of the context); a request may set its own.
    sink_window: int = 0
