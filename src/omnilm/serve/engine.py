"""A generation engine with continuous batching over a paged KV cache, prefix caching and chunked prefill.

Written for this project (the scheduling is the point of the serving stage). Requests are submitted from any
thread into a bounded waiting queue; ``step`` (called in a loop by one thread) does one round of work:

1. **admit** waiting requests in arrival order while the block pool can hold them: a request takes the blocks
   for its prompt plus ``max_new_tokens`` positions at once, so it can never be stopped for lack of memory,
   and reuses the cached blocks of the longest prefix of its prompt that was computed before (the last prompt
   token is always computed, for its logits). When the blocks do not fit, the request waits at the head of the
   queue (no overtaking);
2. **decode** one token for every request whose prompt is done, in one batched forward pass;
3. **prefill** up to ``prefill_chunk`` prompt tokens of the requests still reading their prompts (oldest
   first, a long prompt in several chunks over several steps), in a second forward pass, so a long prompt delays
   running streams by one chunk per step instead of stalling them; a request whose prompt is complete samples
   its first token.

Each request keeps its own positions (0, 1, 2, … whatever its block table), so it computes exactly what it
would compute alone; a finished, cancelled or failed request returns its blocks at once. An exception in a
step fails the requests that step touched (with the error), is logged with its traceback, and the engine goes
on with the others; non-finite logits fail their request only.

Log-probabilities (:mod:`omnilm.serve.logprobs`): a request with ``logprobs`` records each sampled token's
log-probability and top alternatives from the logits it was sampled from; one with ``prompt_logprobs`` records
those of its prompt tokens from the prefill passes (the logits of every prompt position, not only the last, for
every scored row of the pass at once). Such a request reuses no cached prefix (cached positions have no logits),
but its blocks are offered to the cache like any other's. A ``prompt_only`` request ends once its prompt is read
(finish reason "length"): scoring without generation.

Attention sinks (StreamingLLM, ``SamplingParams(attention_sinks=K, sink_window=W)``): such a request streams past
the context with constant memory and computes what ``generate`` computes with the same settings. It reads its
prompt like any other (positions 0, 1, …, each query seeing the first K tokens and the W before itself), then keeps
only the first K positions and the W most recent ones: after every pass the kept window moves down to the slots
after the sinks, its keys rotated back by as many RoPE positions, and the blocks past K + W + 1 positions go back
to the pool, so a request holds at most max(prompt, K + W + 1) positions whatever its length. Positions are slots
of that bounded cache, as in ``generate``. Its blocks are rewritten in place, so it neither reuses nor offers
cached prefixes.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from omnilm.infer.detokenize import StreamingDecoder
from omnilm.infer.generate import make_generator
from omnilm.infer.sampling import SamplingParams, next_token
from omnilm.model.attention import rotate_keys, sink_rotation_freq
from omnilm.model.transformer import Transformer
from omnilm.serve.blocks import NULL_BLOCK, BlockPool, block_digests
from omnilm.serve.logprobs import TokenLogprob, logprob_records
from omnilm.serve.paged_cache import PagedBatch, PagedKVCache

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One generation request and its progress. ``on_text`` receives each new piece of text as it is final,
    ``on_finish`` is called once when the request ends (both from the engine's thread)."""

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None
    on_finish: Callable[[], None] | None = None
    request_id: int = field(default_factory=itertools.count().__next__)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    #: "stop" (EOS or stop string), "length", "cancelled", or "error" (then ``error`` says what went wrong).
    finish_reason: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: Record each sampled token's log-probability with this many top alternatives (None: record nothing).
    logprobs: int | None = None
    #: Record the prompt tokens' log-probabilities with this many top alternatives (None: record nothing).
    prompt_logprobs: int | None = None
    #: End once the prompt is read, sampling nothing (``max_tokens`` 0: scoring only).
    prompt_only: bool = False
    #: Receives each sampled token's record as it is made (from the engine's thread).
    on_logprob: Callable[[TokenLogprob], None] | None = None
    #: One record per sampled token, the end-of-sequence token included when the request ended with it.
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    #: One record per prompt token after the first (the first has no log-probability).
    prompt_token_logprobs: list[TokenLogprob] = field(default_factory=list)

    def _end(self, reason: str, error: str | None = None) -> None:
        if self.done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self.done.set()
        if self.on_finish is not None:
            self.on_finish()

    def _emit_logprob(self, record: TokenLogprob) -> None:
        self.token_logprobs.append(record)
        if self.on_logprob is not None:
            self.on_logprob(record)

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            if self.on_text is not None:
                self.on_text(piece)


def sink_window(params: SamplingParams, max_len: int) -> int:
    """The recent-token window of a request streaming with attention sinks (0: it has none); its default is the
    rest of the context. ValueError when the sinks, the window and the new token do not fit ``max_len``."""
    sinks = params.attention_sinks
    if not sinks:
        return 0
    window = params.sink_window or max_len - sinks - 1
    if window < 1 or sinks + window + 1 > max_len:
        raise ValueError(f"attention_sinks ({sinks}) + sink_window ({params.sink_window or window}) + 1 must fit "
                         f"the context of {max_len}")
    return window


def check_context(prompt_len: int, params: SamplingParams, max_len: int) -> None:
    """Raise ValueError when a prompt of ``prompt_len`` tokens and its generation do not fit a context of
    ``max_len``: the prompt plus ``max_new_tokens``, or with attention sinks the prompt and the sinks + window
    (the output is then unbounded)."""
    if not params.attention_sinks:
        if prompt_len + params.max_new_tokens > max_len:
            raise ValueError(f"prompt ({prompt_len} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"the context of {max_len}")
        return
    sink_window(params, max_len)
    if prompt_len > max_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) exceeds the context of {max_len}")


def kv_positions(prompt_len: int, params: SamplingParams, max_len: int) -> int:
    """The most positions a request ever holds in the KV cache (the last sampled token is never fed back)."""
    full = prompt_len + params.max_new_tokens - 1
    window = sink_window(params, max_len)
    return min(full, max(prompt_len, params.attention_sinks + window + 1)) if window else full


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the request was not taken (retry later)."""


class EngineUnavailable(RuntimeError):
    """The engine is restarting after a fault; the request was not taken (retry later)."""


class RequestQueue:
    """What every engine shares: a bounded, thread-safe waiting queue, validation, cancellation and failure.

    ``max_queue`` bounds the requests waiting to start (None: unbounded); ``submit_all`` beyond it raises
    :class:`QueueFull` and takes nothing. Two locks: ``lock`` is held by a whole ``step``, ``queue_lock`` only
    for moments, so submitting and cancelling from other threads never wait for a step: a cancellation that
    arrives during a step is applied as soon as it ends.
    """

    max_len: int
    #: Whether this engine streams requests with attention sinks (the others refuse them).
    serves_sinks = False

    def __init__(self, max_queue: int | None = None) -> None:
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        self.queue_lock = threading.Lock()
        self.pending: list[tuple[Request, str | None]] = []  # failures and cancellations to apply after a step
        self.max_queue = max_queue

    def check(self, request: Request) -> None:
        """Raise ValueError for a request this engine can never serve."""
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if request.params.attention_sinks and not self.serves_sinks:
            raise ValueError("attention sinks are served by the batching engine only (not speculative decoding "
                             "or a Thinker)")
        check_context(len(request.prompt_ids), request.params, self.max_len)

    def submit(self, request: Request) -> Request:
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[Request]) -> list[Request]:
        """Queue all of ``requests`` or none of them (ValueError for an invalid one, QueueFull when full)."""
        for request in requests:
            self.check(request)
        with self.queue_lock:
            if self.max_queue is not None and len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (at most {self.max_queue})")
            self.waiting.extend(requests)
        return list(requests)

    def cancel(self, request: Request) -> None:
        """Stop ``request``, freeing whatever it holds (at once, or as soon as a running step ends)."""
        self.fail([request], None)

    def fail(self, requests: Iterable[Request], error: str | None) -> None:
        """End ``requests`` (those not done yet): with ``error``, as failed; without, as cancelled."""
        with self.queue_lock:
            for request in requests:
                if request.done.is_set():
                    continue
                if request in self.waiting:
                    self.waiting.remove(request)
                    request._end("cancelled" if error is None else "error", error)
                else:
                    self.pending.append((request, error))
            if not self.pending:
                return
        if self.lock.acquire(blocking=False):  # no step is running: apply now
            try:
                self._apply_pending()
            finally:
                self.lock.release()

    def _apply_pending(self) -> None:
        """End the requests failed or cancelled while a step ran (called with ``lock`` held)."""
        with self.queue_lock:
            pending, self.pending = self.pending, []
        self._fail_locked((request for request, _ in pending), None, {id(r): e for r, e in pending})

    def _fail_locked(self, requests: Iterable[Request], error: str | None,
                     errors: dict[int, str | None] | None = None) -> None:
        """End running ``requests`` now (``lock`` held); ``errors`` gives a request its own error."""
        for request in list(requests):
            if request.done.is_set():
                continue
            reason = errors.get(id(request), error) if errors is not None else error
            self._release(request)
            request._end("cancelled" if reason is None else "error", reason)

    def active(self) -> list[Request]:
        """Requests started and not finished."""
        raise NotImplementedError

    def _release(self, request: Request) -> None:
        """Free the resources of a running ``request`` (called with the lock held)."""
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.active())

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.active()), "waiting": len(self.waiting)}

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()


@dataclass(eq=False)
class _Sequence:
    """A running request: its tokens, its block table and how much of it the cache holds."""

    request: Request
    decoder: StreamingDecoder
    generator: torch.Generator | None
    tokens: list[int]  # the prompt, then every sampled token (the last one is fed at the next decode step)
    blocks: list[int]  # block table
    digests: list[bytes]  # digests of the sequence's full blocks known so far
    registered: int  # leading blocks that are in the prefix cache (hits, or registered once written)
    computed: int  # positions whose keys/values are in the cache
    seen: torch.Tensor | None  # (1, vocab) tokens seen, for the repetition penalty
    sinks: int = 0  # attention sinks kept (0: a full cache)
    window: int = 0  # recent positions kept after the sinks
    evicted: int = 0  # positions dropped so far: the cache holds slots 0 … computed − evicted − 1

    @property
    def prompt_done(self) -> bool:
        return self.computed >= len(self.request.prompt_ids)


class Engine(RequestQueue):
    """Runs many requests at once; ``submit`` from any thread, ``step`` (or ``run_until_idle``) decodes.

    ``kv_budget_bytes`` sizes the block pool (keys and values of every layer); ``block_size`` positions per
    block; at most ``max_batch`` requests run at once; ``prefill_chunk`` prompt tokens are prefilled per step;
    ``max_queue`` bounds the waiting queue.
    """

    serves_sinks = True

    def __init__(self, model: Transformer, tokenizer: Any, max_len: int | None = None,
                 kv_budget_bytes: int = 256 * 2**20, block_size: int = 16, max_batch: int = 64,
                 prefill_chunk: int = 256, max_queue: int | None = None) -> None:
        super().__init__(max_queue)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = max_len or model.config.max_seq_len
        if prefill_chunk < 1 or max_batch < 1:
            raise ValueError("prefill_chunk and max_batch must be ≥ 1")
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        weight = model.tok_emb.weight
        per_block = PagedKVCache.bytes_per_block(model.config, block_size, weight.dtype)
        num_blocks = kv_budget_bytes // per_block
        if num_blocks < 2:
            raise ValueError(f"a KV budget of {kv_budget_bytes} bytes holds no block of {block_size} positions "
                             f"({per_block} bytes each, one more is reserved)")
        self.pool = BlockPool(num_blocks, block_size)
        self.cache = PagedKVCache(model.config, num_blocks, block_size, weight.device, weight.dtype)
        self.device = weight.device
        self.sink_freq = sink_rotation_freq(model.config, self.device)  # turns kept keys back after evictions
        self.running: list[_Sequence] = []
        eos = {tokenizer.eos_id, model.config.eos_token_id}
        self.eos_ids = {i for i in eos if i is not None}

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def check(self, request: Request) -> None:
        super().check(request)
        if request.params.attention_sinks and self.model.config.sliding_window is not None:
            raise ValueError("attention sinks are not served for a sliding-window model (its window already "
                             "bounds what each token sees)")
        needed = self.pool.blocks_for(kv_positions(len(request.prompt_ids), request.params, self.max_len))
        if needed > self.pool.capacity:
            raise ValueError(f"the request needs {needed} KV blocks of {self.block_size} positions; the KV budget "
                             f"holds {self.pool.capacity}")

    def active(self) -> list[Request]:
        return [s.request for s in self.running]

    def stats(self) -> dict[str, Any]:
        pool = self.pool
        return super().stats() | {"kv_blocks": pool.capacity, "kv_blocks_in_use": pool.num_in_use,
                                  "block_size": pool.block_size, "prefix_cache_hit_blocks": pool.hits,
                                  "prefix_cache_queried_blocks": pool.queries}

    def _release(self, request: Request) -> None:
        for seq in self.running:
            if seq.request is request:
                self.running.remove(seq)
                self.pool.release(seq.blocks)
                return

    # ------------------------------------------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, decode one token of every request past its prompt, then prefill one chunk."""
        with self.lock:
            self._apply_pending()
            for phase in (self._admit, self._decode, self._prefill):
                touched: list[Request] = []
                try:
                    phase(touched)
                except Exception as err:  # noqa: BLE001 - any fault fails its requests, not the engine
                    log.exception("engine step failed; failing %d request(s)", len(touched))
                    self._fail_locked(touched, f"{type(err).__name__}: {err}")
            self._apply_pending()

    def _admit(self, touched: list[Request]) -> None:
        size = self.block_size
        while len(self.running) < self.max_batch:
            with self.queue_lock:
                if not self.waiting:
                    return
                request = self.waiting[0]
                prompt, params = request.prompt_ids, request.params
                digests = block_digests(prompt, size)
                # The last prompt token is always computed; a scored prompt computes every position; a sink
                # request rewrites its blocks, so it shares none.
                shares = request.prompt_logprobs is None and not params.attention_sinks
                reusable = digests[: (len(prompt) - 1) // size] if shares else []
                cached = self.pool.cached_prefix(reusable)
                total = self.pool.blocks_for(kv_positions(len(prompt), params, self.max_len))
                blocks = self.pool.allocate(cached, total - len(cached))
                if blocks is None:
                    return  # waits for blocks to be freed; nothing behind it overtakes
                self.waiting.popleft()
            touched[:] = [request]
            seq = _Sequence(request, StreamingDecoder(self.tokenizer, params.stop),
                            make_generator(params.seed, self.device), list(prompt), blocks, digests, len(cached),
                            len(cached) * size, None, params.attention_sinks, sink_window(params, self.max_len))
            self.running.append(seq)  # from here on a failure releases its blocks
            self.pool.record_lookup(len(reusable), len(cached))
            self.cache.clear(blocks[len(cached):])
            if params.repetition_penalty != 1.0:
                seq.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                seq.seen[0, prompt] = True

    def _decode(self, touched: list[Request]) -> None:
        rows = [(seq, seq.tokens[-1:]) for seq in self.running if seq.prompt_done]
        touched += [seq.request for seq, _ in rows]
        if rows:
            self._sample([seq for seq, _ in rows], self._forward(rows))

    def _prefill(self, touched: list[Request]) -> None:
        rows, budget = [], self.prefill_chunk
        for seq in self.running:
            remaining = len(seq.request.prompt_ids) - seq.computed
            if remaining > 0 and budget > 0:
                take = min(remaining, budget)
                rows.append((seq, seq.tokens[seq.computed: seq.computed + take]))
                budget -= take
        touched += [seq.request for seq, _ in rows]
        if rows:
            logits = self._forward(rows)
            done = [i for i, (seq, _) in enumerate(rows) if seq.prompt_done and not seq.request.done.is_set()]
            for i in [i for i in done if rows[i][0].request.prompt_only]:
                self._finish(rows[i][0], "length")
            done = [i for i in done if not rows[i][0].request.prompt_only]
            if done:
                self._sample([rows[i][0] for i in done], logits[done])

    def _forward(self, rows: list[tuple[_Sequence, list[int]]]) -> torch.Tensor:
        """Feed each row's new tokens after its cached positions; logits at each row's last new token (B, V)."""
        size, device = self.block_size, self.device
        batch, width = len(rows), max(len(tokens) for _, tokens in rows)
        starts = [seq.computed for seq, _ in rows]  # tokens read so far
        slots = [seq.computed - seq.evicted for seq, _ in rows]  # cache positions in use (fewer with sinks)
        counts = [len(tokens) for _, tokens in rows]
        n_blocks = self.pool.blocks_for(max(s + c for s, c in zip(slots, counts, strict=True)))
        # Built as Python lists and turned into tensors once (per-row tensor writes cost more than the model here).
        ids = torch.tensor([tokens + [0] * (width - len(tokens)) for _, tokens in rows])
        tables = torch.tensor([seq.blocks[:n_blocks] + [NULL_BLOCK] * (n_blocks - len(seq.blocks[:n_blocks]))
                               for seq, _ in rows])
        write_rows, write_cols, write_slots = [], [], []
        for b, ((seq, tokens), start) in enumerate(zip(rows, slots, strict=True)):
            write_rows += [b] * len(tokens)
            write_cols += range(len(tokens))
            write_slots += [seq.blocks[p // size] * size + p % size for p in range(start, start + len(tokens))]
        start_t = torch.tensor(slots)[:, None]
        positions = start_t + torch.arange(width)[None, :]  # (B, T)
        keys = torch.arange(n_blocks * size)
        real = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]  # (B, T)
        # A query sees its own request's positions up to itself; a padding query sees key 0 only (no NaN).
        mask = (keys[None, None, :] <= positions[:, :, None]) & real[:, :, None]
        if any(seq.sinks for seq, _ in rows):  # a sink request's query sees its sinks and the window before it
            sinks = torch.tensor([seq.sinks for seq, _ in rows])[:, None, None]
            window = torch.tensor([seq.window if seq.sinks else n_blocks * size for seq, _ in rows])[:, None, None]
            mask &= (keys[None, None, :] < sinks) | (positions[:, :, None] - keys[None, None, :] <= window)
        mask[:, :, 0] |= ~real
        view = PagedBatch(self.cache, tables.to(device), torch.tensor(write_rows, device=device),
                          torch.tensor(write_cols, device=device), torch.tensor(write_slots, device=device))
        hidden = self.model.hidden_states(ids.to(device), mask[:, None].to(device), positions.to(device), view)
        last = hidden[torch.arange(batch, device=device), torch.tensor(counts, device=device) - 1]  # (B, d)
        for seq, count in zip((s for s, _ in rows), counts, strict=True):
            seq.computed += count
            if not seq.sinks:
                self._register_full_blocks(seq)
        self._evict([seq for seq, _ in rows if seq.sinks and seq.prompt_done])
        self._fail_locked(self._score_prompts(rows, starts, hidden), "the model produced non-finite logits")
        return self.model.lm_head(last)

    def _score_prompts(self, rows: list[tuple[_Sequence, list[int]]], starts: list[int],
                       hidden: torch.Tensor) -> list[Request]:
        """Record the log-probabilities of the prompt tokens this pass predicts, for the rows that ask for them:
        ``hidden`` (B, T, d) at position ``p`` of a prompt gives the distribution of prompt token ``p + 1``.
        Returns the requests whose logits were not finite (to be failed)."""
        picked, targets, owners = [], [], []
        for b, ((seq, tokens), start) in enumerate(zip(rows, starts, strict=True)):
            prompt = seq.request.prompt_ids
            if seq.request.prompt_logprobs is None or start >= len(prompt):
                continue
            count = min(start + len(tokens), len(prompt) - 1) - start  # the prompt's last token predicts no prompt
            if count > 0:
                picked.append(hidden[b, :count])  # (count, d)
                targets += prompt[start + 1: start + 1 + count]
                owners += [seq] * count
        if not picked:
            return []
        logits = self.model.lm_head(torch.cat(picked))  # (N, V)
        finite = torch.isfinite(logits).all(-1).tolist()
        records = logprob_records(logits, torch.tensor(targets), [s.request.prompt_logprobs for s in owners])
        bad = {id(s): s.request for s, ok in zip(owners, finite, strict=True) if not ok}
        for seq, record in zip(owners, records, strict=True):
            if id(seq) not in bad:
                seq.request.prompt_token_logprobs.append(record)
        return list(bad.values())

    def _evict(self, seqs: list[_Sequence]) -> None:
        """Attention sinks: keep each sequence's first ``sinks`` positions and its ``window`` most recent ones,
        the window moved down to the slots after the sinks with its keys rotated back as far (one gather per
        distance for all layers), then hand back the blocks that no longer hold anything."""
        size, moves, freed = self.block_size, {}, []
        for seq in seqs:
            held = seq.computed - seq.evicted
            evict = held - seq.sinks - seq.window
            if evict <= 0:
                continue
            src, dst = moves.setdefault(evict, ([], []))
            src += [seq.blocks[p // size] * size + p % size for p in range(seq.sinks + evict, held)]
            dst += [seq.blocks[p // size] * size + p % size for p in range(seq.sinks, held - evict)]
            seq.evicted += evict
            keep = self.pool.blocks_for(seq.sinks + seq.window + 1)  # the next token's slot included
            freed += seq.blocks[keep:]
            del seq.blocks[keep:]
        for evict, (src, dst) in moves.items():
            src_t, dst_t = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
            keys = self.cache.k[:, src_t]  # (layers, n, kv_heads, head_dim), a copy: sources and targets overlap
            if self.sink_freq is not None:
                keys = rotate_keys(keys, -evict, self.sink_freq)
            self.cache.k[:, dst_t] = keys
            self.cache.v[:, dst_t] = self.cache.v[:, src_t]
        self.pool.release(freed)  # after the moves, which may read from these blocks

    def _register_full_blocks(self, seq: _Sequence) -> None:
        """Offer every newly completed block of ``seq`` to the prefix cache."""
        size = self.block_size
        for index in range(seq.registered, seq.computed // size):
            if index >= len(seq.digests):
                parent = seq.digests[index - 1] if index else b""
                seq.digests += block_digests(seq.tokens[index * size:(index + 1) * size], size, parent)
            self.pool.register(seq.blocks[index], seq.digests[index])
        seq.registered = max(seq.registered, seq.computed // size)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token from its row of ``logits`` (B, V), record it, finish what is done."""
        finite = torch.isfinite(logits).all(-1).tolist()
        argmax = logits.argmax(-1).tolist()  # greedy rows without a penalty: one call for all of them
        chosen: list[tuple[int, _Sequence, int]] = []
        for row, (seq, ok) in enumerate(zip(seqs, finite, strict=True)):
            request = seq.request
            if not ok:
                self._fail_locked([request], "the model produced non-finite logits")
                continue
            if request.params.greedy and seq.seen is None:
                token = argmax[row]
            else:
                token = int(next_token(logits[row: row + 1], request.params, seq.seen, seq.generator)[0])
            chosen.append((row, seq, token))
        # Log-probabilities from the same logits, before penalty, temperature and filters (the model's own).
        scored = [(row, seq, token) for row, seq, token in chosen if seq.request.logprobs is not None]
        if scored:
            records = logprob_records(logits[[row for row, _, _ in scored]],
                                      torch.tensor([token for _, _, token in scored]),
                                      [seq.request.logprobs for _, seq, _ in scored])
            for (_, seq, _), record in zip(scored, records, strict=True):
                seq.request._emit_logprob(record)
        for _, seq, token in chosen:
            self._accept(seq, token)

    def _accept(self, seq: _Sequence, token: int) -> None:
        request = seq.request
        if token in self.eos_ids:
            self._finish(seq, "stop")
            return
        request.output_ids.append(token)
        request._emit(seq.decoder.push(token))
        if seq.decoder.stopped:
            self._finish(seq, "stop")
        elif len(request.output_ids) >= request.params.max_new_tokens:
            self._finish(seq, "length")
        else:
            seq.tokens.append(token)
            if seq.seen is not None:
                seq.seen[0, token] = True

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.request._emit(seq.decoder.finish())
        self._release(seq.request)
        seq.request._end(reason)

