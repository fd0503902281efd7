"""Serving with a draft model (``omnilm serve --draft-model``) or the model's own multi-token heads (``--mtp``):
requests decoded one at a time, speculatively.

Speculative decoding lowers the latency of a single stream; it does not batch. This engine has the same
interface as :class:`omnilm.serve.engine.Engine` (``submit``, ``cancel``, ``busy``, ``step``), so the server is
the same; each ``step`` runs one speculative round (1 to k + 1 tokens) of the oldest request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from omnilm.infer.detokenize import StreamingDecoder
from omnilm.infer.generate import make_generator
from omnilm.infer.speculative import Drafter, speculative_tokens
from omnilm.model.transformer import Transformer
from omnilm.serve.engine import Request, RequestQueue

log = logging.getLogger(__name__)


class SpeculativeEngine(RequestQueue):
    """One request at a time; the target verifies the draft's proposals (exact acceptance rule)."""

    def __init__(self, model: Transformer, draft: Transformer | Drafter, tokenizer, k: int = 4,  # noqa: ANN001
                 max_queue: int | None = None) -> None:
        """``draft``: a draft model, or another drafter such as the model's multi-token heads (``--mtp``)."""
        super().__init__(max_queue)
        self.model, self.tokenizer, self.k = model.eval(), tokenizer, k
        self.draft = draft.eval() if isinstance(draft, Transformer) else draft
        self.max_len = model.config.max_seq_len
        self.eos_ids = {i for i in (tokenizer.eos_id, model.config.eos_token_id) if i is not None}
        self._current: tuple[Request, Iterator[list[int]], StreamingDecoder] | None = None

    def active(self) -> list[Request]:
        return [] if self._current is None else [self._current[0]]

    def _release(self, request: Request) -> None:
        if self._current is not None and self._current[0] is request:
            self._current = None

    def _finish(self, reason: str) -> None:
        request, _, decoder = self._current
        request._emit(decoder.finish())
        self._current = None
        request._end(reason)

    @torch.inference_mode()
    def step(self) -> None:
        with self.lock:
            self._apply_pending()
            try:
                self._round()
            except Exception as err:  # noqa: BLE001 - a fault fails its request, not the engine
                log.exception("speculative step failed")
                if self._current is not None:
                    request = self._current[0]
                    self._current = None
                    request._end("error", f"{type(err).__name__}: {err}")

    def _round(self) -> None:
        if self._current is None:
            with self.queue_lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            generator = make_generator(request.params.seed, self.model.tok_emb.weight.device)
            rounds = speculative_tokens(self.model, self.draft, request.prompt_ids, request.params, self.k,
                                        sorted(self.eos_ids), generator)
            self._current = (request, rounds, StreamingDecoder(self.tokenizer, request.params.stop))
        request, rounds, decoder = self._current
        tokens = next(rounds, None)
        if tokens is None:
            self._finish("length")
            return
        for token in tokens:
            if token in self.eos_ids:
                self._finish("stop")
                return
            request.output_ids.append(token)
            request._emit(decoder.push(token))
            if decoder.stopped:
                self._finish("stop")
                return
            if len(request.output_ids) >= request.params.max_new_tokens:
                self._finish("length")
                return
