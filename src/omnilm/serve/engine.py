"""A generation engine with continuous batching over a preallocated, slot-based KV cache.

Written for this project. The cache has one row ("slot") per running request and one shared write position
``t``: every decode step feeds one token per slot and writes its key/value at ``t``. A request joins between
steps: its prompt is prefilled alone, and its keys/values are copied into a free slot so that they end just
before ``t`` (right-aligned); the positions before them are masked out for that slot, and its position ids
count its own tokens, so it computes exactly what it would compute alone. When ``t`` reaches the end of the
buffer, all slots shift left by the longest prefix that no running request uses. A finished or cancelled
request frees its slot at once.

The number of slots follows from the KV memory budget: each slot holds ``max_len`` positions of keys and
values for every layer.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from omnilm.infer.detokenize import StreamingDecoder
from omnilm.infer.sampling import SamplingParams, next_token
from omnilm.model.transformer import Transformer


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
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "cancelled"
    done: threading.Event = field(default_factory=threading.Event)

    def _end(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
        self.done.set()
        if self.on_finish is not None:
            self.on_finish()

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            if self.on_text is not None:
                self.on_text(piece)


@dataclass
class _Slot:
    request: Request
    decoder: StreamingDecoder
    generator: torch.Generator | None
    length: int  # positions this request occupies in the cache (prompt + fed tokens)
    next_input: int  # the token to feed at the next step


def kv_bytes_per_slot(model: Transformer, max_len: int) -> int:
    """Cache memory of one slot: keys and values of every layer for ``max_len`` positions."""
    config = model.config
    element = model.tok_emb.weight.element_size()
    return 2 * config.n_layer * config.kv_heads * max_len * config.dim_per_head * element


class RequestQueue:
    """What every engine shares: a thread-safe queue of waiting requests checked against the context."""

    max_len: int

    def __init__(self) -> None:
        self.waiting: list[Request] = []
        self.lock = threading.Lock()

    def submit(self, request: Request) -> Request:
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(request.prompt_ids) + request.params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens "
                             f"({request.params.max_new_tokens}) exceeds the context of {self.max_len}")
        with self.lock:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` now, freeing whatever it holds."""
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)
            self._release(request)
            if not request.done.is_set():
                request._end("cancelled")

    def _release(self, request: Request) -> None:
        """Free the resources of a running ``request`` (called with the lock held)."""
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        raise NotImplementedError

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()


class Engine(RequestQueue):
    """Runs many requests at once; ``submit`` from any thread, ``step`` (or ``run_until_idle``) decodes."""

    def __init__(self, model: Transformer, tokenizer, max_len: int | None = None,  # noqa: ANN001
                 kv_budget_bytes: int = 256 * 2**20, max_slots: int = 64) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = max_len or model.config.max_seq_len
        slots = min(max_slots, kv_budget_bytes // kv_bytes_per_slot(model, self.max_len))
        if slots < 1:
            raise ValueError(f"a KV budget of {kv_budget_bytes} bytes holds no slot of {self.max_len} positions")
        p = model.tok_emb.weight
        self.cache = model.new_cache(slots, self.max_len)
        self.valid = torch.zeros(slots, self.max_len, dtype=torch.bool, device=p.device)
        self.slots: list[_Slot | None] = [None] * slots
        eos = {tokenizer.eos_id, model.config.eos_token_id}
        self.eos_ids = {i for i in eos if i is not None}

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def _release(self, request: Request) -> None:
        for index, slot in enumerate(self.slots):
            if slot is not None and slot.request is request:
                self._free(index)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    # ------------------------------------------------------------------------------------------------ internals

    def _free(self, index: int) -> None:
        self.slots[index] = None
        self.valid[index] = False

    def _finish(self, index: int, reason: str) -> None:
        slot = self.slots[index]
        slot.request._emit(slot.decoder.finish())
        self._free(index)
        slot.request._end(reason)

    def _make_room(self, needed: int) -> None:
        """Shift every slot left so that ``needed`` positions fit before the end of the buffer."""
        t = self.cache.length
        used = [s.length for s in self.slots if s is not None]
        shift = t - max(used, default=0)
        if t + needed > self.max_len:
            shift = min(shift, t)
            if shift <= 0 or t - shift + needed > self.max_len:
                return
            for buffer in (self.cache.k, self.cache.v):
                buffer[:, :, :, : t - shift] = buffer[:, :, :, shift:t].clone()
            self.valid[:, : t - shift] = self.valid[:, shift:t].clone()
            self.valid[:, t - shift:] = False
            self.cache.length = t - shift

    @torch.inference_mode()
    def _admit(self, request: Request) -> bool:
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not free:
            return False
        index, n = free[0], len(request.prompt_ids)
        device = self.cache.k.device
        self._make_room(1)
        if self.cache.length < n:  # the shared position moves forward; other slots see masked gaps
            self.cache.length = n if n <= self.max_len else self.cache.length
        if self.cache.length + 1 > self.max_len or self.cache.length < n:
            return False
        solo = self.model.new_cache(1, n)
        logits = self.model(torch.tensor([request.prompt_ids], device=device), cache=solo, last_only=True)[:, -1]
        t = self.cache.length
        self.cache.k[:, index, :, t - n:t] = solo.k[:, 0]
        self.cache.v[:, index, :, t - n:t] = solo.v[:, 0]
        self.valid[index] = False
        self.valid[index, t - n:t] = True
        params = request.params
        generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        slot = _Slot(request, StreamingDecoder(self.tokenizer, params.stop), generator, n, -1)
        self.slots[index] = slot
        self._accept(index, int(next_token(logits, params, None, generator)[0]))
        return True

    def _accept(self, index: int, token: int) -> None:
        """Record a sampled token of slot ``index``; finish the request when it is done."""
        slot = self.slots[index]
        request = slot.request
        if token in self.eos_ids:
            self._finish(index, "stop")
            return
        request.output_ids.append(token)
        request._emit(slot.decoder.push(token))
        if slot.decoder.stopped:
            self._finish(index, "stop")
        elif len(request.output_ids) >= request.params.max_new_tokens:
            self._finish(index, "length")
        else:
            slot.next_input = token

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots, then decode one token for every running request."""
        with self.lock:
            while self.waiting and self._admit(self.waiting[0]):
                self.waiting.pop(0)
            running = [i for i, s in enumerate(self.slots) if s is not None]
            if not running:
                return
            self._make_room(1)
            t = self.cache.length
            device = self.cache.k.device
            feed = torch.zeros(self.capacity, 1, dtype=torch.long, device=device)
            positions = torch.zeros(self.capacity, 1, dtype=torch.long, device=device)
            for i in running:
                feed[i, 0], positions[i, 0] = self.slots[i].next_input, self.slots[i].length
            self.valid[running, t] = True
            mask = self.valid[:, : t + 1].clone()
            idle = [i for i in range(self.capacity) if i not in running]
            mask[idle, t] = True  # idle rows attend to themselves only; their output is ignored
            logits = self.model(feed, mask.long(), positions, cache=self.cache)[:, -1]
            self.valid[idle, t] = False
            for i in running:
                slot = self.slots[i]
                slot.length += 1
                token = next_token(logits[i: i + 1], slot.request.params, None, slot.generator)
                self._accept(i, int(token[0]))
