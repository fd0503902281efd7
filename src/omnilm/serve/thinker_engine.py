"""Serving a Thinker (``omnilm serve`` on a thinker folder): requests with audio, images and video, one at a time.

The server encodes every conversation before it submits it (OpenAI content parts → processor parts →
:class:`~omnilm.omni.processor.OmniProcessor`): a medium that cannot be read is then a 400 for the client rather
than a failed request, and the prompt's length, which the media decide, is checked against the context like any
other. A request reaches this engine as a :class:`ThinkerRequest` whose ``media`` holds the Thinker's media
arguments (mel features, pixel patches, grids) as numpy arrays: when the engine runs in a process of its own they
are pickled through its pipe by value, whereas torch tensors would travel as shared-memory handles that live only
as long as the sender keeps them. The engine process therefore does model work only.

The engine has the interface of :class:`omnilm.serve.engine.Engine` (``submit_all``, ``fail``, ``active``,
``step``, ``stats``), so the server and its runners are the same. Like the speculative engine it serves one
request at a time: a step prefills the oldest request's text and media, or decodes one more token of it, with
:func:`omnilm.omni.generate.generate_thinker`. Requests are not batched (media encoders and TMRoPE positions differ
per request); the others wait in the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from omnilm.infer.detokenize import StreamingDecoder
from omnilm.infer.generate import FINISHED
from omnilm.omni.generate import generate_thinker
from omnilm.omni.processor import MEDIA_KEYS
from omnilm.omni.thinker import Thinker
from omnilm.serve.engine import Request, RequestQueue

log = logging.getLogger(__name__)

def media_arrays(batch: dict[str, Any]) -> dict[str, Any]:
    """The media arguments of a collated one-conversation batch as numpy arrays (and ``use_audio_in_video``)."""
    out: dict[str, Any] = {}
    for key in MEDIA_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            out[key] = value.numpy()
        elif value is not None:
            out[key] = value
    return out


def media_tensors(media: dict[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """The Thinker's keyword arguments for ``media`` (from :func:`media_arrays`) on ``device``."""
    return {key: torch.from_numpy(value).to(device) if isinstance(value, np.ndarray) else value
            for key, value in (media or {}).items()}


@dataclass(eq=False)
class ThinkerRequest(Request):
    """A request whose prompt has media placeholders: ``media`` holds what replaces them (see
    :func:`media_arrays`). Equality stays the base class's (by field, identity of callbacks), arrays unseen."""

    media: dict[str, Any] | None = None


@dataclass(eq=False)
class _Running:
    """The request being generated, its token stream and its detokenizer."""

    request: Request
    tokens: Iterator[torch.Tensor]
    decoder: StreamingDecoder


class ThinkerEngine(RequestQueue):
    """One request at a time through a Thinker; ``submit`` from any thread, ``step`` (or ``run_until_idle``)
    generates. ``max_queue`` bounds the waiting queue."""

    def __init__(self, thinker: Thinker, tokenizer: Any, max_queue: int | None = None) -> None:
        super().__init__(max_queue)
        self.model = thinker.eval()
        self.tokenizer = tokenizer
        self.max_len = thinker.config.text.max_seq_len
        self.device = next(thinker.parameters()).device
        eos = (tokenizer.eos_id, thinker.config.text.eos_token_id)
        self.eos_ids = {i for i in eos if i is not None}
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self._current: _Running | None = None

    def active(self) -> list[Request]:
        return [] if self._current is None else [self._current.request]

    def _release(self, request: Request) -> None:
        if self._current is not None and self._current.request is request:
            self._current.tokens.close()  # drops the request's KV cache now rather than at garbage collection
            self._current = None

    def step(self) -> None:
        """Prefill the next waiting request, or decode one token of the running one."""
        with self.lock:
            self._apply_pending()
            try:
                self._advance()
            except Exception as err:  # noqa: BLE001 - a fault fails its request, not the engine
                log.exception("thinker step failed")
                if self._current is not None:
                    request = self._current.request
                    self._release(request)
                    request._end("error", f"{type(err).__name__}: {err}")
            self._apply_pending()

    def _start(self, request: Request) -> _Running:
        ids = torch.tensor([request.prompt_ids], device=self.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch |= media_tensors(getattr(request, "media", None), self.device)
        # A generator: nothing runs until the first next(), which prefills text and media.
        tokens = generate_thinker(self.model, batch, request.params, sorted(self.eos_ids), self.pad_id)
        return _Running(request, tokens, StreamingDecoder(self.tokenizer, request.params.stop))

    def _advance(self) -> None:
        if self._current is None:
            with self.queue_lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            self._current = self._start(request)  # from here on a failure ends this request
        running = self._current
        request = running.request
        step = next(running.tokens, None)
        if step is None:
            self._finish("length")
            return
        token = int(step[0])
        if token == FINISHED or token in self.eos_ids:
            self._finish("stop")
            return
        request.output_ids.append(token)
        request._emit(running.decoder.push(token))
        if running.decoder.stopped:
            self._finish("stop")
        elif len(request.output_ids) >= request.params.max_new_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        running = self._current
        running.request._emit(running.decoder.finish())
        self._release(running.request)
        running.request._end(reason)
