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

Speech. When the thinker folder has a voice (:func:`omnilm.omni.speech.load_voice`) the engine also speaks, where
the model lives: a :class:`ThinkerRequest` with ``speak_reply`` is written as usual, then (its KV cache freed) its
reply is read out by ``Voice.speak`` on the same prompt, media and reply tokens; one with ``say`` speaks that text
(``Voice.speak_text``) and writes nothing. Either way a step produces one chunk of audio, handed to ``on_audio``
as a float32 numpy array (mono, in [-1, 1], at ``voice.sample_rate``), so chunks reach the client while the
Talker decodes and a cancellation stops speech between two chunks. A spoken request ends (``on_finish``) after
its last chunk, with the finish reason of its text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
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
    :func:`media_arrays`). ``speak_reply``: speak the reply once written; ``say``: speak this text instead of
    writing a reply (``prompt_ids`` then unused, may be empty). Audio goes to ``on_audio`` chunk by chunk."""

    media: dict[str, Any] | None = None
    speak_reply: bool = False
    say: str | None = None
    on_audio: Callable[[np.ndarray], None] | None = None

    def _emit_audio(self, chunk: np.ndarray) -> None:
        if len(chunk) and self.on_audio is not None:
            self.on_audio(chunk)


def speech_fields(request: Request) -> dict[str, Any] | None:
    """What a :class:`ThinkerRequest` adds to the base request (to rebuild it in the engine process), or None for
    a plain request."""
    if not isinstance(request, ThinkerRequest):
        return None
    return {"media": request.media, "speak_reply": request.speak_reply, "say": request.say}


@dataclass(eq=False)
class _Running:
    """The request being served: its prompt batch, token stream and detokenizer while it writes; its audio stream
    and the finish reason of its text once it speaks."""

    request: Request
    batch: dict[str, Any] | None = None
    tokens: Iterator[torch.Tensor] | None = None
    decoder: StreamingDecoder | None = None
    speech: Iterator[np.ndarray] | None = None
    reason: str = "stop"

    def close(self) -> None:
        """Stop both streams now (their generators free the KV caches they hold, rather than at garbage collection)."""
        for stream in (self.tokens, self.speech):
            close = getattr(stream, "close", None)
            if close is not None:
                close()


class ThinkerEngine(RequestQueue):
    """One request at a time through a Thinker; ``submit`` from any thread, ``step`` (or ``run_until_idle``)
    generates. ``max_queue`` bounds the waiting queue; ``voice`` (a :class:`omnilm.omni.speech.Voice`, or None)
    speaks."""

    def __init__(self, thinker: Thinker, tokenizer: Any, max_queue: int | None = None, voice: Any = None) -> None:
        super().__init__(max_queue)
        self.model = thinker.eval()
        self.voice = voice
        self.tokenizer = tokenizer
        self.max_len = thinker.config.text.max_seq_len
        self.device = next(thinker.parameters()).device
        eos = (tokenizer.eos_id, thinker.config.text.eos_token_id)
        self.eos_ids = {i for i in eos if i is not None}
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self._current: _Running | None = None

    def check(self, request: Request) -> None:
        if isinstance(request, ThinkerRequest) and (request.speak_reply or request.say is not None):
            if self.voice is None:
                raise ValueError("this model has no voice: it writes text only")
            if request.say is not None:
                if not request.say.strip():
                    raise ValueError("there is no text to speak")
                return
        super().check(request)

    def active(self) -> list[Request]:
        return [] if self._current is None else [self._current.request]

    def _release(self, request: Request) -> None:
        if self._current is not None and self._current.request is request:
            self._current.close()
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
        say = getattr(request, "say", None)
        if say is not None:  # generators: nothing runs until the first next()
            return _Running(request, speech=self.voice.speak_text(say))
        ids = torch.tensor([request.prompt_ids], device=self.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch |= media_tensors(getattr(request, "media", None), self.device)
        # The first next() prefills text and media.
        tokens = generate_thinker(self.model, batch, request.params, sorted(self.eos_ids), self.pad_id)
        return _Running(request, batch, tokens, StreamingDecoder(self.tokenizer, request.params.stop))

    def _advance(self) -> None:
        if self._current is None:
            with self.queue_lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            self._current = self._start(request)  # from here on a failure ends this request
        running = self._current
        request = running.request
        if running.speech is not None:
            chunk = next(running.speech, None)
            if chunk is None:
                self._release(request)
                request._end(running.reason)
            else:
                request._emit_audio(np.ascontiguousarray(chunk, dtype=np.float32))
            return
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
        """The text is done: end the request, or go on to speak it."""
        running = self._current
        request = running.request
        request._emit(running.decoder.finish())
        if not getattr(request, "speak_reply", False):
            self._release(request)
            request._end(reason)
            return
        running.tokens.close()  # the Thinker's KV cache is not needed to speak
        running.tokens, running.reason = None, reason
        # The reply's tokens as generated (the Voice adds the end of turn); past a stop string the text was cut
        # but the tokens were not, so the Voice reads the tokens up to the one that completed the stop string.
        running.speech = self.voice.speak(running.batch, list(request.output_ids))
