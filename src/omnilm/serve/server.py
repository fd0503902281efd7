"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both also streaming as server-sent events,
with ``stream_options.include_usage``), ``POST /v1/audio/speech`` (a model with a voice, below), ``GET /v1/models``,
``GET /health`` (with the engine's load) and ``GET /`` (a web chat). The engine runs in a process of its own (or a
thread, see :mod:`omnilm.serve.runner`); request handlers only submit requests and relay their text and sound.

What a client can rely on:

- a bad request gets an OpenAI-style error object with a 4xx status and the server keeps serving; a body over the
  limit is refused as soon as the limit is passed (also when sent chunked, without a length);
- when the waiting queue is full the answer is 429 with ``Retry-After``;
- a fault in the engine (an exception, non-finite logits) fails the requests it touched with a 500 error object,
  is logged with its traceback, and the engine goes on serving; an engine process that dies fails its requests
  and is restarted (503 with ``Retry-After`` meanwhile); every request ends within ``request_timeout_s``
  (504 after it), and a client that disconnects cancels its request, whose KV blocks are freed at once;
- message content is encoded as plain text: a special-token string in a message cannot forge a turn.

Completions take OpenAI's ``prompt`` forms: a string, a list of strings, a list of token ids or a list of lists
of token ids (several prompts make ``n`` choices each, numbered prompt by prompt; token ids outside the vocabulary
are a 400). ``echo`` returns each prompt (detokenised) before its completion, and ``max_tokens`` 0 with ``echo``
returns the prompt alone. ``logprobs: N`` (0 to 20) reports ``tokens``, ``token_logprobs``, ``top_logprobs`` (the
``N`` most likely, as ``{text: logprob}``) and ``text_offset`` for the generated tokens and, with ``echo``, for
the prompt's (the first prompt token's log-probability and top list are null): what lm-eval's
``local-completions`` reads to score a continuation. ``best_of`` generates that many choices per prompt and
returns the ``n`` with the highest mean log-probability per token (not streamed). Chat takes ``logprobs: true``
and ``top_logprobs: K`` (0 to 20) and answers ``choices[i].logprobs.content`` (``token``, ``logprob``, ``bytes``,
``top_logprobs``), streamed too. Prompt log-probabilities come from the forward passes that read the prompt, and
those of generated tokens from the logits they were sampled from, before temperature and filters: the model's
own distribution (:mod:`omnilm.serve.logprobs`). A Thinker and a speculative server record none (400).

Chat takes OpenAI's ``tools`` and ``tool_choice`` (none, auto, required, or a named function) and answers a reply
that calls tools as ``message.tool_calls`` with ``finish_reason`` ``"tool_calls"``, streamed as ``delta.tool_calls``;
conversations may hold assistant ``tool_calls`` and ``tool`` results. A reply whose call is malformed is ordinary
text (:mod:`omnilm.serve.tools`).

Both endpoints take ``attention_sinks`` and ``sink_window`` (an extension; defaults ``omnilm serve
--attention-sinks K --sink-window W``): the request then streams with constant memory, keeping its first K tokens
and the W most recent ones (StreamingLLM, :mod:`omnilm.serve.engine`), so ``max_tokens`` may exceed what is left of
the context; sinks + window + 1 must fit the context (400 otherwise; also from a speculative, Thinker or
sliding-window server, which do not stream so).

Content may also be a list of OpenAI content parts. A text model takes ``{"type": "text", "text": ...}`` parts
(joined) and refuses any other part with a 400 naming its type. A Thinker (a thinker folder, served by
:mod:`omnilm.serve.thinker_engine`) also takes media, inline only (there is no network to fetch from):

- ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``: PNG or JPEG in a data: URL (any
  other URL is a 400);
- ``{"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}``: PCM WAV of any rate, mono or
  stereo, at most 30 s (other formats are a 400: no decoder for them here);
- ``{"type": "video", "video": {"frames": [data URLs...], "fps": 2, "audio": {"data": BASE64, "format": "wav"}}}``
  (an extension of the OpenAI format): at most 64 PNG/JPEG frames of one size, ``fps`` the rate they were taken at
  (default: the model's own sampling rate, every frame used), and an optional soundtrack the model hears along
  with the frames (audio-in-video).

The server process decodes and encodes the media (so a bad one is a 400, and the prompt's length, media
placeholders included, is checked against the context); the engine gets token ids and numpy arrays.

A Thinker whose folder has a voice (``talker/`` and ``token2wav/``, :func:`omnilm.omni.speech.load_voice`) also
speaks; /v1/models then lists ``output_modalities`` ``["text", "audio"]``, its one voice (``voices``) and its
``audio_sample_rate``. Speech is made in the engine process, after the text, and reaches the server as numpy
chunks (:mod:`omnilm.serve.thinker_engine`); what a client gets is 16-bit PCM (:mod:`omnilm.serve.audio_out`):

- ``POST /v1/audio/speech`` (OpenAI's text to speech: ``input``, ``voice``, ``response_format`` ``wav`` or
  ``pcm``, ``stream_format``): ``wav`` is sent whole with its exact sizes; ``pcm`` (raw s16le at the voice's rate,
  also in the ``X-Sample-Rate`` header) and ``stream_format: "audio"`` stream the bytes as they are made (a
  streamed WAV's header then marks its length unknown); ``stream_format: "sse"`` sends them base64 in
  ``speech.audio.delta`` events, then ``speech.audio.done``. A failure before the first sound is an error status;
- chat completions with ``modalities: ["text", "audio"]`` (and ``audio: {voice, format}``): the reply is written,
  then spoken. Whole: ``message.audio`` is ``{id, data: base64 wav (or pcm16), transcript: the reply,
  expires_at}`` and ``content`` is null, as OpenAI answers. Streamed (``pcm16`` only): first the text, as
  ``delta.audio.transcript`` pieces while the Thinker writes, then the sound, as ``delta.audio.data`` (base64 pcm16)
  chunks while the Talker speaks, then ``{id, expires_at}``, then the finish reason. An assistant turn sent back
  as ``{"audio": {"id"}}`` without content stands for its transcript until ``expires_at``.

Asking a model without a voice for audio, an unknown voice or an unsupported format is a 400 naming what is
supported.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import io
import json
import logging
import math
import threading
import time
import uuid
import wave
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from omnilm.errors import UserError
from omnilm.infer.sampling import SamplingParams
from omnilm.serve.audio_out import CHAT_AUDIO_FORMATS, SPEECH_FORMATS, Transcripts, pcm16, wav, wav_header
from omnilm.serve.config import ServeConfig
from omnilm.serve.engine import EngineUnavailable, QueueFull, Request, RequestQueue, sink_window
from omnilm.serve.logprobs import MAX_TOP_LOGPROBS, Offsets, TokenLogprob, TokenText, completion_logprobs
from omnilm.serve.tools import ToolRequest, ToolRequestError, ToolStream, assistant_turn, reply_message, tool_request
from omnilm.tokenizer.chat import CHAT_ROLES, encode_chat, validate_messages

log = logging.getLogger(__name__)

MAX_CHOICES = 8
#: Most prompts in one completions request (lm-eval sends a batch of prompts per request).
MAX_PROMPTS = 256
#: Limits on what a request may bring to a Thinker (besides the body size and the context).
MAX_AUDIO_SECONDS = 30.0
MIN_AUDIO_SECONDS = 0.1  # a shorter sound says nothing (under 20 ms the encoder's strides leave no token)
MAX_VIDEO_FRAMES = 64
#: Decoded pixels of all images and frames of a request: a flat PNG of 4096² pixels compresses to a few KB, so the
#: body limit alone does not bound what decoding costs.
MAX_REQUEST_PIXELS = 1 << 25
IMAGE_FORMATS = ("PNG", "JPEG")
MEDIA_PARTS = ("image_url", "input_audio", "video")
TEXT_MODALITIES = ["text"]
THINKER_MODALITIES = ["text", "audio", "image", "video"]
OUTPUT_MODALITIES = ("text", "audio")
#: Longest ``input`` of /v1/audio/speech, in characters (OpenAI's bound).
MAX_SPEECH_CHARS = 4096


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class AudioOutput:
    """How a chat reply is to be spoken: the voice and the format of ``message.audio.data``."""

    voice: str
    format: str


@dataclass(frozen=True)
class SpeechRequest:
    """A validated /v1/audio/speech request."""

    text: str
    format: str
    #: None (the body as a whole; ``pcm`` streams anyway), "audio" (the bytes as made) or "sse".
    stream_format: str | None


@dataclass
class GenerationRequest:
    """A validated completion request: the token ids of its prompts (chat: one) and how to sample ``n`` choices
    of each."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    #: A Thinker's media arguments for the placeholders in the prompt (numpy arrays), or None.
    media: dict[str, Any] | None = None
    #: Speak the reply (chat with ``modalities`` including "audio"), or None.
    audio: AudioOutput | None = None
    #: Completions: return each prompt before its completion.
    echo: bool = False
    #: Report log-probabilities with this many top alternatives per token (None: no log-probabilities).
    logprobs: int | None = None
    #: Choices generated per prompt, of which the ``n`` most likely per token are returned (``best_of``).
    best_of: int = 1
    #: ``max_tokens`` 0 with ``echo``: the prompt only, nothing generated.
    prompt_only: bool = False
    #: Chat with tools: the replies are read back as tool calls (:mod:`omnilm.serve.tools`), or None.
    tools: ToolRequest | None = None

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt of a one-prompt request (every chat request)."""
        return self.prompts[0]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float | None = None) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a number, got {json.dumps(value)}", param=key)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise APIError(400, f"{key} must be {bounds}, got {value}", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"of at least {low}"
        raise APIError(400, f"{key} must be an integer {bounds}, got {json.dumps(value)}", param=key)
    return value


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A short JSON rendering of a value for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_draft(target: Any, target_tokenizer: Any, draft: Any, draft_tokenizer: Any) -> None:
    """Refuse a draft model (config and tokenizer) that cannot serve ``target``'s, before any request reaches it."""
    if draft.vocab_size != target.vocab_size:
        raise UserError(f"the draft model's vocabulary ({draft.vocab_size} tokens) differs from the "
                        f"model's ({target.vocab_size})")
    if draft_tokenizer.backend.get_vocab() != target_tokenizer.backend.get_vocab():
        raise UserError("the draft model's tokenizer differs from the model's: the same ids would mean other text")
    if draft.max_seq_len < target.max_seq_len:
        raise UserError(f"the draft model's context ({draft.max_seq_len}) is shorter than the model's "
                        f"({target.max_seq_len})")


class MediaDecoder:
    """Decodes the OpenAI content parts of one request into the parts :class:`~omnilm.omni.processor.OmniProcessor`
    reads (uint8 pixel arrays, 16 kHz waveforms); every error is a 400 naming the message and part."""

    def __init__(self) -> None:
        self.pixels = 0  # decoded so far in this request

    @staticmethod
    def _bytes(data: Any, at: str, what: str) -> bytes:
        if not isinstance(data, str) or not data:
            raise APIError(400, f"{at}: {what} must be a non-empty base64 string", param="messages")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise APIError(400, f"{at}: {what} is not valid base64 ({err})", param="messages") from err

    def data_url(self, url: Any, at: str) -> bytes:
        """The bytes of a ``data:<type>;base64,...`` URL (any other URL is refused: nothing is fetched)."""
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{at}: the url must be a non-empty string", param="messages")
        if not url.startswith("data:"):
            scheme = url.split(":", 1)[0] if ":" in url else url[:20]
            raise APIError(400, f"{at}: only data: URLs are accepted (this server fetches nothing, so a {scheme!r} "
                           "URL cannot be read); send the file inline as data:image/png;base64,...",
                           param="messages")
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{at}: a data: URL must be base64 (data:image/png;base64,...)", param="messages")
        return self._bytes(payload, at, "the data: URL's payload")

    def image(self, data: bytes, at: str) -> Any:
        """An (H, W, 3) uint8 array from PNG or JPEG bytes."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise APIError(400, f"{at}: {image.format} images are not accepted (PNG or JPEG)",
                                   param="messages")
                width, height = image.size  # read from the header, before any pixel is decoded
                self.pixels += width * height
                if self.pixels > MAX_REQUEST_PIXELS:
                    raise APIError(400, f"{at}: the request's images and frames hold more than "
                                   f"{MAX_REQUEST_PIXELS} pixels", param="messages")
                return np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise APIError(400, f"{at}: not a readable PNG or JPEG image ({err})", param="messages") from err

    def audio(self, value: Any, at: str) -> Any:
        """A 16 kHz mono float32 waveform from ``{"data": base64, "format": "wav"}``."""
        import tempfile

        from omnilm.omni.audio import SAMPLE_RATE, read_wav, resample

        if not isinstance(value, dict):
            raise APIError(400, f"{at}: audio must be an object {{data, format}}", param="messages")
        kind = value.get("format")
        if not isinstance(kind, str) or kind.lower() != "wav":
            raise APIError(400, f"{at}: audio format {kind!r} is not supported: send 16-bit PCM WAV "
                           "(format 'wav'); this server has no decoder for compressed audio", param="messages")
        data = self._bytes(value.get("data"), at, "the audio data")
        with tempfile.NamedTemporaryFile(suffix=".wav") as file:  # read_wav reads files
            file.write(data)
            file.flush()
            try:
                waveform, rate = read_wav(file.name)
            except (wave.Error, EOFError, OSError, ValueError) as err:
                raise APIError(400, f"{at}: not a readable PCM WAV file ({err})", param="messages") from err
        seconds = len(waveform) / rate if rate else 0.0
        if seconds > MAX_AUDIO_SECONDS:
            raise APIError(400, f"{at}: {seconds:.1f} s of audio; at most {MAX_AUDIO_SECONDS:g} s per audio",
                           param="messages")
        if seconds < MIN_AUDIO_SECONDS:
            raise APIError(400, f"{at}: {seconds:.3f} s of audio; at least {MIN_AUDIO_SECONDS:g} s",
                           param="messages")
        return resample(waveform, rate, SAMPLE_RATE)

    def video(self, value: Any, at: str) -> dict[str, Any]:
        """A processor video part from ``{"frames": [data URLs], "fps": ..., "audio": optional}``."""
        if not isinstance(value, dict):
            raise APIError(400, f"{at}: video must be an object {{frames, fps, audio}}", param="messages")
        frames = value.get("frames")
        if not isinstance(frames, list) or not frames:
            raise APIError(400, f"{at}: video.frames must be a non-empty list of data: URLs", param="messages")
        if len(frames) > MAX_VIDEO_FRAMES:
            raise APIError(400, f"{at}: {len(frames)} video frames; at most {MAX_VIDEO_FRAMES}", param="messages")
        fps = value.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                                or not math.isfinite(fps) or not 0 < fps <= 240):
            raise APIError(400, f"{at}: video.fps must be a number in (0, 240], got {json.dumps(fps)}",
                           param="messages")
        decoded = []
        for k, url in enumerate(frames):
            decoded.append(self.image(self.data_url(url, f"{at}, frame {k}"), f"{at}, frame {k}"))
            if decoded[-1].shape != decoded[0].shape:
                raise APIError(400, f"{at}, frame {k}: {decoded[-1].shape[1]}x{decoded[-1].shape[0]} pixels, "
                               f"frame 0 is {decoded[0].shape[1]}x{decoded[0].shape[0]}: a video's frames have "
                               "one size", param="messages")
        part: dict[str, Any] = {"type": "video", "video": decoded, "fps": fps}
        if value.get("audio") is not None:
            part["audio"] = self.audio(value["audio"], f"{at}, video.audio")
        return part

    def part(self, part: dict[str, Any], at: str) -> dict[str, Any]:
        """The processor part for an OpenAI media part."""
        kind = part["type"]
        if kind == "image_url":
            value = part.get("image_url")
            url = value.get("url") if isinstance(value, dict) else value
            return {"type": "image", "image": self.image(self.data_url(url, at), at)}
        if kind == "input_audio":
            return {"type": "audio", "audio": self.audio(part.get("input_audio"), at)}
        return self.video(part.get("video"), at)


def chat_contents(messages: Any, media: bool) -> list[dict[str, Any]]:
    """Check OpenAI chat ``messages`` and bring their content to what the model reads: a string per message for a
    text model (text parts joined), a list of processor parts for a Thinker (``media``). 400 on anything wrong,
    naming the message (and part)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    decoder = MediaDecoder() if media else None
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"message {i}: expected an object with role and content, got "
                           f"{type(message).__name__}", param="messages")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise APIError(400, f"message {i}: unknown role {role!r} (allowed: {', '.join(CHAT_ROLES)})",
                           param="messages")
        if role == "assistant" and message.get("tool_calls") is not None and not media:
            try:
                out.append(assistant_turn(message))
            except UserError as err:
                raise APIError(400, f"message {i}: {err}", param="messages") from err
            continue
        if isinstance(content, str):
            if not content:
                raise APIError(400, f"message {i}: empty content", param="messages")
            out.append({"role": role, "content": content if not media else [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list) or not content:
            raise APIError(400, f"message {i}: content must be a string or a non-empty list of content parts",
                           param="messages")
        parts = []
        for j, part in enumerate(content):
            at = f"message {i}, part {j}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{at}: a text part needs a string 'text'", param="messages")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in MEDIA_PARTS:
                if decoder is None:
                    raise APIError(400, f"{at}: this model reads text only and cannot take a {kind!r} part",
                                   param="messages")
                parts.append(decoder.part(part, at))
            else:
                known = ", ".join(("text", *MEDIA_PARTS)) if media else "text"
                shown = json.dumps(kind) if kind is not None else "no type"
                raise APIError(400, f"{at}: unknown content part type {shown} (known: {known})", param="messages")
        if media:
            out.append({"role": role, "content": parts})
        else:
            text = "".join(p["text"] for p in parts)
            if not text:
                raise APIError(400, f"message {i}: empty content", param="messages")
            out.append({"role": role, "content": text})
    return out


class Channel:
    """The events of one HTTP request, from the engine thread to its handler on the event loop.

    The engine appends ``(choice, text piece)`` pairs (or ``(choice, audio chunk)``, a numpy array, when the choice
    is spoken), ``(choice, None)`` at a choice's end, without blocking; the
    handler is woken once per engine step (``Service.flush``) however many events arrived, and takes them all at
    once. (One wake-up per token from another thread costs a system call and a task switch each, which under
    load competes with the engine for the interpreter.)
    """

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        self.service, self.loop = service, loop
        self.items: deque[tuple[int, Any]] = deque()
        self.waiter: asyncio.Future | None = None

    def push(self, item: tuple[int, Any]) -> None:
        """Called from any thread."""
        self.items.append(item)
        self.service.notify(self)

    def wake(self) -> None:
        """Called on the event loop."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self, timeout: float) -> list[tuple[int, Any]]:
        """Every event that arrived, waiting up to ``timeout`` seconds for one (an empty list if none came)."""
        if not self.items:
            self.waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, self.wake)
            try:
                await self.waiter
            finally:
                timer.cancel()
                self.waiter = None
        taken = []
        while self.items:
            taken.append(self.items.popleft())
        return taken


class Guard:
    """ASGI middleware: the API key on /v1/ routes (compared in constant time, so timing cannot recover it) and
    a declared body length over the limit, both refused before the request reaches a route. Plain ASGI, so
    streamed responses pass through untouched."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.limit = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            error = None
            if self.expected is not None and scope["path"].startswith("/v1/") and not hmac.compare_digest(
                    headers.get(b"authorization", b""), self.expected):
                error = APIError(401, "invalid or missing API key", kind="authentication_error",
                                 code="invalid_api_key")
            length = headers.get(b"content-length", b"")
            if error is None and length.isdigit() and int(length) > self.limit:
                error = APIError(413, f"request body larger than {self.limit} bytes")
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Service:
    """The tokenizer, the engine's runner (a thread, or a process of its own) and the channels to the handlers."""

    def __init__(self, model_dir: str | Path, model_name: str | None = None, config: ServeConfig | None = None,
                 **overrides: Any) -> None:
        import dataclasses

        from omnilm.model.hf import read_config
        from omnilm.model.mtp import has_heads
        from omnilm.omni.processor import OMNI_TOKENS
        from omnilm.omni.thinker import is_thinker_folder, read_media_budget
        from omnilm.serve.runner import ProcessRunner, ThreadRunner, build_engine
        from omnilm.tokenizer import Tokenizer

        self.config = dataclasses.replace(config or ServeConfig(), **overrides)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.name = model_name or Path(model_dir).resolve().name
        #: The retrieval index whose passages go into chat requests' last user turn (``config.rag``), or None.
        self.rag: Any = None
        if self.config.rag is not None:
            from omnilm.rag.index import RagIndex

            if self.config.rag_top_k < 1:
                raise UserError(f"rag_top_k must be at least 1, got {self.config.rag_top_k}")
            self.rag = RagIndex.load(self.config.rag)
        #: The Thinker's conversation encoder when the model reads media (a thinker folder), else None.
        self.processor: Any = None
        self.sliding_window: int | None = None  # the served text model's, which rules out attention sinks
        if is_thinker_folder(model_dir):
            from omnilm.omni.processor import OmniProcessor
            from omnilm.omni.thinker import read_thinker_config

            if self.config.draft_model is not None or self.config.mtp:
                raise UserError("a draft model cannot serve a Thinker (speculative decoding is for text models)")
            thinker_config = read_thinker_config(model_dir)
            self.context, self.vocab_size = thinker_config.text.max_seq_len, thinker_config.text.vocab_size
            self.processor = OmniProcessor(self.tokenizer, thinker_config, read_media_budget(model_dir))
            self.media_ids = {self.tokenizer.token_to_id(t) for t in OMNI_TOKENS.values()}
        else:
            model_config = read_config(model_dir)
            self.context, self.vocab_size = model_config.max_seq_len, model_config.vocab_size
            if self.config.draft_model is not None and self.config.mtp:
                raise UserError("draft with --draft-model or with the model's own heads (--mtp), not both")
            if self.config.draft_model is not None:
                check_draft(model_config, self.tokenizer, read_config(self.config.draft_model),
                            Tokenizer.from_dir(self.config.draft_model))
            if self.config.mtp and not has_heads(model_dir):
                raise UserError(f"{model_dir} has no multi-token-prediction heads (mtp.json) for --mtp")
            self.sliding_window = model_config.sliding_window
        #: Why this server cannot report log-probabilities (None: it can; the batching engine records them).
        self.no_scores = ("a Thinker's engine records no log-probabilities" if self.processor is not None else
                          "the speculative engine (--draft-model, --mtp) records no log-probabilities"
                          if self.config.draft_model is not None or self.config.mtp else None)
        self._check_sinks()
        self.token_text = TokenText(self.tokenizer)
        self.dirty: set[Channel] = set()
        self.dirty_lock = threading.Lock()
        self.created = int(time.time())
        self.runner: ThreadRunner | ProcessRunner
        if self.config.engine_process:
            self.runner = ProcessRunner(model_dir, self.config, self.flush)
        else:
            self.runner = ThreadRunner(build_engine(model_dir, self.config), self.flush)
        #: The engine's voice (``name``, ``sample_rate``; see :func:`omnilm.serve.runner.voice_info`), or None.
        self.voice: dict[str, Any] | None = self.runner.voice
        self.transcripts = Transcripts()

    @property
    def no_sinks(self) -> str | None:
        """Why this server cannot stream with attention sinks (None: it can; the batching engine does)."""
        if self.processor is not None:
            return "a Thinker's engine does not stream with attention sinks"
        if self.config.draft_model is not None or self.config.mtp:
            return "the speculative engine (--draft-model, --mtp) does not stream with attention sinks"
        if self.sliding_window is not None:
            return "a sliding-window model is not served with attention sinks"
        return None

    def _check_sinks(self) -> None:
        """Refuse server-wide sinks settings that no request could use."""
        sinks, window = self.config.attention_sinks, self.config.sink_window
        if sinks < 0 or window < 0:
            raise UserError("--attention-sinks and --sink-window must be ≥ 0")
        if window and not sinks:
            raise UserError("--sink-window needs --attention-sinks")
        if sinks and self.no_sinks is not None:
            raise UserError(f"--attention-sinks: {self.no_sinks}")
        try:
            sink_window(SamplingParams(attention_sinks=sinks, sink_window=window), self.context)
        except ValueError as err:
            raise UserError(str(err)) from None

    def _sinks(self, body: dict[str, Any]) -> tuple[int, int]:
        """A request's ``attention_sinks`` and ``sink_window`` (the server's by default), checked (400)."""
        sinks = _integer(body, "attention_sinks", self.config.attention_sinks, 0)
        window = _integer(body, "sink_window", self.config.sink_window, 0)
        if not sinks:
            if "sink_window" in body and window:
                raise APIError(400, "sink_window needs attention_sinks", param="sink_window")
            return 0, 0
        if self.no_sinks is not None:
            raise APIError(400, f"attention_sinks is not available from this server: {self.no_sinks}",
                           param="attention_sinks")
        try:
            sink_window(SamplingParams(attention_sinks=sinks, sink_window=window), self.context)
        except ValueError as err:
            raise APIError(400, str(err), param="sink_window") from None
        return sinks, window

    @property
    def scores(self) -> bool:
        """Whether the engine records log-probabilities (``logprobs``, ``best_of``, ``max_tokens`` 0)."""
        return self.no_scores is None

    @property
    def modalities(self) -> list[str]:
        """What the served model reads (``input_modalities`` of /v1/models; the web chat shows media controls
        when it lists more than text)."""
        return THINKER_MODALITIES if self.processor is not None else TEXT_MODALITIES

    @property
    def output_modalities(self) -> list[str]:
        """What the served model answers in (``output_modalities`` of /v1/models)."""
        return list(OUTPUT_MODALITIES) if self.voice is not None else ["text"]

    @property
    def engine(self) -> RequestQueue:
        """The engine itself, when it runs in this process (a thread runner)."""
        return self.runner.engine  # type: ignore[union-attr]

    @property
    def model(self) -> Any:
        """The served model, when the engine runs in this process."""
        return self.engine.model  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop the engine (requests still running are cancelled)."""
        self.runner.close()

    @property
    def healthy(self) -> bool:
        return self.runner.alive

    def notify(self, channel: Channel) -> None:
        """``channel`` has new events (its handler is woken at the next ``flush``)."""
        with self.dirty_lock:
            self.dirty.add(channel)

    def flush(self) -> None:
        """Wake the handlers of every channel with new events: one call into each event loop."""
        with self.dirty_lock:
            channels, self.dirty = self.dirty, set()
        by_loop: dict[asyncio.AbstractEventLoop, list[Channel]] = {}
        for channel in channels:
            by_loop.setdefault(channel.loop, []).append(channel)
        for loop, group in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop that has closed has nobody left to wake
                loop.call_soon_threadsafe(_wake_all, group)

    def parse(self, body: dict[str, Any], chat: bool) -> GenerationRequest:
        """Validate an OpenAI request body into a GenerationRequest (APIError on anything wrong)."""
        if body.get("model") not in (None, self.name):
            raise APIError(404, f"The model {body.get('model')!r} does not exist; this server serves {self.name!r}",
                           kind="invalid_request_error", param="model", code="model_not_found")
        media = audio = None
        if chat:
            if "messages" not in body:
                raise APIError(400, "messages is required", param="messages")
            audio = self._audio_output(body)
            try:
                tools = tool_request(body, text_model=self.processor is None)
            except ToolRequestError as err:
                raise APIError(400, str(err), param=err.param) from err
            if tools is not None and audio is not None:
                raise APIError(400, "a spoken reply cannot call tools", param="tools")
            messages = chat_contents(self._with_transcripts(body["messages"]), media=self.processor is not None)
            if self.rag is not None:
                messages = self._with_passages(messages)
            try:
                if self.processor is None:
                    prompt_ids, _ = encode_chat(self.tokenizer, validate_messages(messages), add_generation_prompt=True,
                                                tools=tools.tools if tools else None,
                                                prefix=tools.prefix if tools else "")
                else:
                    prompt_ids, media = self._encode_media(messages)
            except (UserError, ValueError) as err:
                raise APIError(400, str(err), param="messages") from err
            logprobs = self._chat_logprobs(body)
            prompts, echo, best_of = [prompt_ids], False, None
        else:
            tools = None
            prompts = self._prompts(body.get("prompt"))
            echo = body.get("echo", False)
            if not isinstance(echo, bool):
                raise APIError(400, f"echo must be true or false, got {json.dumps(echo)}", param="echo")
            logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
            best_of = _integer(body, "best_of", None, 1)
        param = "messages" if chat else "prompt"
        for i, prompt_ids in enumerate(prompts):
            if len(prompt_ids) >= self.context:
                at = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise APIError(400, f"{at} has {len(prompt_ids)} tokens; the model's context is {self.context}",
                               param=param, code="context_length_exceeded")
        longest = max(len(prompt_ids) for prompt_ids in prompts)
        room = self.context - longest
        sinks, window = self._sinks(body)
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = _integer(body, key, min(room, 256), 0 if echo else 1)
        if max_tokens > room and not sinks:  # with sinks the output streams past the context
            raise APIError(400, f"{key}={max_tokens} plus the prompt's {longest} tokens exceeds the "
                           f"context of {self.context}", param=key, code="context_length_exceeded")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        stream = bool(body.get("stream", False))
        n = _integer(body, "n", 1, 1)
        if n > MAX_CHOICES:
            raise APIError(400, f"n must be at most {MAX_CHOICES}", param="n")
        best_of = n if best_of is None else best_of
        if not n <= best_of <= MAX_CHOICES:
            raise APIError(400, f"best_of must be between n ({n}) and {MAX_CHOICES}, got {best_of}", param="best_of")
        if best_of > n and stream:
            raise APIError(400, "best_of greater than n cannot be streamed: the best choices are known at the end",
                           param="best_of")
        for name, asked in (("logprobs", logprobs is not None), ("best_of", best_of > n),
                            ("max_tokens", max_tokens == 0)):
            if asked and not self.scores:
                raise APIError(400, f"{name} {'0 ' if name == 'max_tokens' else ''}is not available from this "
                               f"server: {self.no_scores}", param=name)
        params = SamplingParams(max_new_tokens=max(max_tokens, 1),
                                temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=tuple(stop),
                                seed=_integer(body, "seed", None, 0), attention_sinks=sinks, sink_window=window)
        return GenerationRequest(prompts, params, n, stream, bool(stream_options.get("include_usage", False)), media,
                                 audio, echo=echo, logprobs=logprobs, best_of=best_of, prompt_only=max_tokens == 0,
                                 tools=tools)

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """The token ids of each prompt of a completions request: OpenAI's four forms, a string, a list of strings,
        a list of token ids or a list of lists of token ids (400 for anything else, an empty prompt, or a token id
        outside the vocabulary)."""
        forms = ("prompt must be a non-empty string, a list of strings, a list of token ids or a list of lists of "
                 "token ids")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_token(prompt[0])):
            items = [prompt]
        elif isinstance(prompt, list) and prompt:
            items = prompt
        else:
            raise APIError(400, f"{forms}, got {_shown(prompt)}", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise APIError(400, f"{len(items)} prompts in one request; at most {MAX_PROMPTS}", param="prompt")
        prompts = []
        for i, item in enumerate(items):
            at = "the prompt" if len(items) == 1 else f"prompt {i}"
            if isinstance(item, str):
                if not item:
                    raise APIError(400, f"{at} is empty; {forms}", param="prompt")
                ids = self.tokenizer.encode(item)  # a raw prompt is the client's whole text, markup included
            elif isinstance(item, list):
                if not item:
                    raise APIError(400, f"{at} is an empty list of token ids", param="prompt")
                wrong = next((t for t in item if not _is_token(t)), None)
                if wrong is not None:
                    raise APIError(400, f"{at}: token ids must be integers, got {_shown(wrong)}", param="prompt")
                outside = next((t for t in item if not 0 <= t < self.vocab_size), None)
                if outside is not None:
                    raise APIError(400, f"{at}: token id {outside} is outside the vocabulary (0 to "
                                   f"{self.vocab_size - 1})", param="prompt")
                ids = list(item)
            else:
                raise APIError(400, f"{forms}; {at} is {_shown(item)}", param="prompt")
            if self.processor is not None and self.media_ids.intersection(ids):
                # Placeholders without media would fail in the engine; media come only through chat parts.
                raise APIError(400, f"{at} holds media marker tokens; send media as content parts to "
                               "/v1/chat/completions", param="prompt")
            prompts.append(ids)
        return prompts

    def _chat_logprobs(self, body: dict[str, Any]) -> int | None:
        """Chat's ``logprobs`` (true or false) and ``top_logprobs`` (0 to 20, only with logprobs) as the number of
        alternatives to report per token, or None."""
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise APIError(400, f"logprobs must be true or false, got {json.dumps(wanted)}", param="logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (top or 0) if wanted else None

    def _no_voice(self, param: str) -> APIError:
        return APIError(400, f"the model {self.name!r} has no voice: it answers in text only (its output_modalities "
                        "are ['text']); a thinker folder speaks when it has talker/ and token2wav/ subfolders",
                        param=param, code="audio_not_supported")

    def _voice_name(self, value: Any, param: str) -> str:
        """The voice a request names (None: the model's one voice); 400 for any other."""
        name = self.voice["name"]  # type: ignore[index]
        if isinstance(value, dict):
            value = value.get("id")
        if value is None or value == name:
            return name
        raise APIError(400, f"unknown voice {json.dumps(value)}; this model speaks with one voice: {name!r}",
                       param=param, code="voice_not_found")

    def _audio_output(self, body: dict[str, Any]) -> AudioOutput | None:
        """How a chat reply is to be spoken (``modalities``, ``audio``), or None for text only."""
        modalities = body.get("modalities")
        if modalities is None:
            modalities = ["text"]
        if not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities):
            raise APIError(400, 'modalities must be a non-empty list of "text" and "audio"', param="modalities")
        unknown = [m for m in modalities if m not in OUTPUT_MODALITIES]
        if unknown:
            raise APIError(400, f"unknown output modality {unknown[0]!r} (known: text, audio)", param="modalities")
        options = body.get("audio")
        if "audio" not in modalities:
            if options is not None:
                raise APIError(400, 'audio options were given but modalities does not include "audio"',
                               param="audio")
            return None
        if self.voice is None:
            raise self._no_voice("modalities")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise APIError(400, "audio must be an object {voice, format}", param="audio")
        stream = bool(body.get("stream", False))
        kind = options.get("format", "pcm16" if stream else "wav")
        if kind not in CHAT_AUDIO_FORMATS:
            raise APIError(400, f"audio.format {json.dumps(kind)} is not supported (supported: "
                           f"{', '.join(CHAT_AUDIO_FORMATS)})", param="audio.format")
        if stream and kind != "pcm16":
            raise APIError(400, f"audio.format {kind!r} cannot be streamed: a streamed reply's audio is 'pcm16'",
                           param="audio.format")
        return AudioOutput(self._voice_name(options.get("voice"), "audio.voice"), kind)

    def _with_passages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with the top passages for the last user turn rendered into it (unchanged when that turn
        is not text)."""
        from omnilm.rag.prompt import last_user_index, with_context

        try:
            last = last_user_index(messages)
        except ValueError:
            return messages
        hits = self.rag.search([messages[last]["content"]], self.config.rag_top_k)[0]
        return with_context(messages, [h.text for h in hits])

    def _with_transcripts(self, messages: Any) -> Any:
        """``messages`` with each assistant turn given as ``{"audio": {"id"}}`` (no content) replaced by its
        transcript; 400 for an id this server does not know (any more)."""
        if not isinstance(messages, list):
            return messages  # chat_contents says what is wrong
        out = []
        for i, message in enumerate(messages):
            reference = message.get("audio") if isinstance(message, dict) else None
            if isinstance(reference, dict) and message.get("role") == "assistant" and not message.get("content"):
                transcript = self.transcripts.get(str(reference.get("id")))
                if transcript is None:
                    raise APIError(400, f"message {i}: the audio {json.dumps(reference.get('id'))} is unknown here "
                                   "or has expired; send the reply's text as content", param="messages")
                message = {**message, "content": transcript}
            out.append(message)
        return out

    def parse_speech(self, body: dict[str, Any]) -> SpeechRequest:
        """Validate a /v1/audio/speech body (APIError on anything wrong)."""
        if body.get("model") not in (None, self.name):
            raise APIError(404, f"The model {body.get('model')!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        if self.voice is None:
            raise self._no_voice("model")
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise APIError(400, "input must be a non-empty string: the text to speak", param="input")
        if len(text) > MAX_SPEECH_CHARS:
            raise APIError(400, f"input has {len(text)} characters; at most {MAX_SPEECH_CHARS}", param="input")
        self._voice_name(body.get("voice"), "voice")
        kind = body.get("response_format", "wav")
        if kind not in SPEECH_FORMATS:
            raise APIError(400, f"response_format {json.dumps(kind)} is not supported (supported: "
                           f"{', '.join(SPEECH_FORMATS)})", param="response_format")
        stream_format = body.get("stream_format")
        if stream_format not in (None, "audio", "sse"):
            raise APIError(400, f"stream_format {json.dumps(stream_format)} is not supported (supported: audio, "
                           "sse)", param="stream_format")
        if body.get("speed") not in (None, 1, 1.0):
            raise APIError(400, "speed is not supported: this voice speaks at its own pace (leave speed out, or 1.0)",
                           param="speed")
        if body.get("instructions"):
            raise APIError(400, "instructions are not supported: this voice has no style control", param="instructions")
        return SpeechRequest(text, kind, stream_format)

    def _encode_media(self, messages: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        """Prompt ids (with placeholders) and media arguments of a conversation for the Thinker."""
        from omnilm.serve.thinker_engine import media_arrays

        example = self.processor.encode(messages, add_generation_prompt=True)
        batch = self.processor.collate([example], pad_id=0, left_pad=True)
        return example.ids, media_arrays(batch)

    def completion_choice(self, parsed: GenerationRequest, index: int, r: Request,
                          prompt_only: bool = False) -> dict[str, Any]:
        """A completions choice for the finished request ``r``: its text (after its prompt with ``echo``) and, with
        ``logprobs``, its tokens' log-probabilities (the prompt's first token has none; a completion that ended with
        the end-of-sequence token lists that token too, though its text is not in ``text``). ``prompt_only``: the
        echoed prompt alone (the first event of a stream)."""
        text, tokens, records, starts = "", [], [], []
        if parsed.echo:
            offsets = Offsets(self.tokenizer, skip_special_tokens=False)
            starts = [offsets.push(token) for token in r.prompt_ids]
            text, tokens, records = offsets.finish(), list(r.prompt_ids), [None, *r.prompt_token_logprobs]
        if not prompt_only:
            generated, base = Offsets(self.tokenizer, skip_special_tokens=True), len(text)
            for record in r.token_logprobs:
                tokens.append(record.token)
                records.append(record)
                starts.append(base + generated.push(record.token))
            text += r.text
        logprobs = None if parsed.logprobs is None else completion_logprobs(self.token_text, tokens, records, starts)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": r.finish_reason}

    def chat_logprobs(self, records: list[TokenLogprob]) -> dict[str, Any]:
        """Chat's ``logprobs`` of ``records`` (the end-of-sequence token, which is no content, left out)."""
        eos = self.runner.eos_ids
        return {"content": [self.token_text.chat_entry(r) for r in records if r.token not in eos], "refusal": None}

    def submit(self, request: GenerationRequest, on_text: Any = None, on_finish: Any = None) -> list[Request]:
        """Queue the ``best_of`` choices of each prompt of ``request`` (all or none: 429 when the queue cannot take
        them), prompt by prompt; ``on_text(choice, piece)`` also receives a spoken choice's audio chunks and, when
        streaming with logprobs, each token's :class:`~omnilm.serve.logprobs.TokenLogprob`."""
        choices = []
        scored = request.logprobs is not None or request.best_of > request.n  # best_of ranks by log-probability
        for prompt_index, prompt_ids in enumerate(request.prompts):
            for j in range(request.best_of):
                index = prompt_index * request.best_of + j
                seed = None if request.params.seed is None else request.params.seed + j
                params = SamplingParams(**{**request.params.__dict__, "seed": seed})
                text_callback = None if on_text is None else (lambda piece, i=index: on_text(i, piece))
                finish_callback = None if on_finish is None else (lambda i=index: on_finish(i))
                if request.media is None and request.audio is None:
                    choice = Request(list(prompt_ids), params, text_callback, finish_callback)
                else:
                    from omnilm.serve.thinker_engine import ThinkerRequest

                    choice = ThinkerRequest(list(prompt_ids), params, text_callback, finish_callback,
                                            media=request.media, speak_reply=request.audio is not None,
                                            on_audio=text_callback)
                if scored:
                    choice.logprobs = request.logprobs or 0
                    choice.on_logprob = text_callback if request.stream else None
                if request.echo and request.logprobs is not None:
                    choice.prompt_logprobs = request.logprobs
                choice.prompt_only = request.prompt_only
                choices.append(choice)
        return self._submit_all(choices)

    def submit_speech(self, text: str, on_audio: Any = None, on_finish: Any = None) -> list[Request]:
        """Queue ``text`` to be spoken: ``on_audio(0, chunk)`` for each chunk, ``on_finish(0)`` at the end."""
        from omnilm.serve.thinker_engine import ThinkerRequest

        request = ThinkerRequest([], SamplingParams(), None, None if on_finish is None else (lambda: on_finish(0)),
                                 say=text, on_audio=None if on_audio is None else (lambda chunk: on_audio(0, chunk)))
        return self._submit_all([request])

    def _submit_all(self, choices: list[Request]) -> list[Request]:
        try:
            self.runner.submit_all(choices)
        except QueueFull as err:
            raise APIError(429, f"the server is busy ({err}); retry later", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(self.config.retry_after_s)}) from err
        except EngineUnavailable as err:
            raise APIError(503, str(err), kind="server_error", code="engine_unavailable",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from err
        except ValueError as err:
            raise APIError(400, str(err)) from err
        return choices

    def cancel(self, requests: list[Request]) -> None:
        unfinished = [r for r in requests if not r.done.is_set()]
        if unfinished:
            self.runner.fail(unfinished, None)


def _wake_all(channels: list[Channel]) -> None:
    for channel in channels:
        channel.wake()


def _coalesce(events: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Adjacent text pieces (or audio chunks) of the same choice joined into one (one streamed event instead of
    several)."""
    import numpy as np

    out: list[tuple[int, Any]] = []
    for index, piece in events:
        last = out[-1][1] if out and out[-1][0] == index else None
        if isinstance(piece, str) and isinstance(last, str):
            out[-1] = (index, last + piece)
        elif isinstance(piece, np.ndarray) and isinstance(last, np.ndarray):
            out[-1] = (index, np.concatenate([last, piece]))
        else:
            out.append((index, piece))
    return out


def _best(parsed: GenerationRequest, submitted: list[Request]) -> list[Request]:
    """The choices to answer: of each prompt's ``best_of``, the ``n`` with the highest mean log-probability per
    token (best first), as OpenAI ranks them; all of them when ``best_of`` is ``n``."""
    if parsed.best_of == parsed.n:
        return submitted

    def mean(r: Request) -> float:
        return sum(record.logprob for record in r.token_logprobs) / max(len(r.token_logprobs), 1)

    out: list[Request] = []
    for start in range(0, len(submitted), parsed.best_of):
        out += sorted(submitted[start: start + parsed.best_of], key=mean, reverse=True)[: parsed.n]
    return out


def _usage(prompt_tokens: int, requests: list[Request]) -> dict[str, int]:
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _failure(requests: list[Request]) -> APIError | None:
    """The error to answer when a choice failed in the engine (500), or None."""
    failed = next((r for r in requests if r.finish_reason == "error"), None)
    if failed is None:
        return None
    return APIError(500, f"generation failed: {failed.error}", kind="server_error", code="engine_error")


def _timeout(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within {seconds:g} s and was cancelled", kind="timeout_error",
                    code="timeout")


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``service``; ``api_key`` (if any) is required on the /v1/ routes."""
    app = FastAPI(title="omnilm", docs_url=None, redoc_url=None)
    limit = service.config.max_body_bytes
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limit)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
        return err.response()

    async def read_body(request: HTTPRequest) -> dict[str, Any]:
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no length: stop reading once past the limit
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body larger than {limit} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"invalid JSON body: {err}") from err
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> JSONResponse:
        if not service.healthy:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"} | service.runner.stats())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": service.name, "object": "model", "created": service.created, "owned_by": "omnilm",
                 "max_model_len": service.context, "input_modalities": service.modalities,
                 "output_modalities": service.output_modalities}
        if service.voice is not None:
            entry |= {"voices": [service.voice["name"]], "audio_sample_rate": service.voice["sample_rate"]}
        return {"object": "list", "data": [entry]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return resources.files("omnilm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    async def events(http: HTTPRequest, submit: Callable[..., list[Request]]) -> tuple[list[Request], AsyncIterator]:
        """Submit with ``submit(on_piece, on_finish)`` (:meth:`Service.submit` or :meth:`Service.submit_speech`, all
        else bound); return the choices and an iterator of lists of (choice, text piece, audio chunk, or None at its
        end).

        The iterator ends early (and cancels what is left) when the client disconnects, and raises the 504
        APIError when the request runs past the server's timeout.
        """
        loop = asyncio.get_running_loop()
        channel = Channel(service, loop)
        # Pieces and the end of each choice travel through one channel, so an end never overtakes its text.
        submitted = submit(lambda i, piece: channel.push((i, piece)), lambda i: channel.push((i, None)))
        deadline = loop.time() + service.config.request_timeout_s

        async def iterate() -> AsyncIterator[list[tuple[int, Any]]]:
            try:
                finished = 0
                while finished < len(submitted):
                    events = await channel.take(timeout=0.1)
                    if events:
                        finished += sum(piece is None for _, piece in events)
                        yield events
                    elif await http.is_disconnected():
                        return
                    if loop.time() > deadline and finished < len(submitted):
                        raise _timeout(service.config.request_timeout_s)
            finally:
                service.cancel(submitted)  # a no-op for finished requests; frees the blocks of abandoned ones

        return submitted, iterate()

    async def complete(request: HTTPRequest, chat: bool) -> Any:
        body = await read_body(request)
        if service.processor is None:
            parsed = service.parse(body, chat)
        else:  # decoding and preprocessing media takes a while: in a worker thread, the other requests go on
            parsed = await asyncio.to_thread(service.parse, body, chat)
        kind = "chat.completion" if chat else "text_completion"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "created": int(time.time()), "model": service.name}
        if parsed.stream:
            return StreamingResponse(stream(request, parsed, chat, head), media_type="text/event-stream")
        submitted, pieces = await events(request, functools.partial(service.submit, parsed))
        sounds: list[list[Any]] = [[] for _ in submitted]
        async for arrived in pieces:
            for i, piece in arrived:
                if piece is not None and not isinstance(piece, (str, TokenLogprob)):
                    sounds[i].append(piece)
        error = _failure(submitted)
        if error is not None:
            raise error

        def message(r: Request, sound: list[Any]) -> tuple[dict[str, Any], str | None]:
            if parsed.tools is not None:
                return reply_message(parsed.tools, r.text, r.finish_reason)
            if parsed.audio is None:
                return {"role": "assistant", "content": r.text}, r.finish_reason
            return ({"role": "assistant", "content": None, "audio": spoken(r.text, sound, parsed.audio.format)},
                    r.finish_reason)

        if chat:
            replies = [message(r, sounds[i]) for i, r in enumerate(submitted)]
            choices = [{"index": i, "message": replies[i][0],
                        "logprobs": service.chat_logprobs(r.token_logprobs) if parsed.logprobs is not None else None,
                        "finish_reason": replies[i][1]} for i, r in enumerate(submitted)]
        else:
            choices = [service.completion_choice(parsed, i, r) for i, r in enumerate(_best(parsed, submitted))]
        return head | {"object": kind, "choices": choices, "usage": _usage(parsed.prompt_tokens, submitted)}

    def spoken(transcript: str, sound: list[Any], kind: str) -> dict[str, Any]:
        """The ``message.audio`` of a whole spoken reply (its transcript kept for later turns)."""
        rate = service.voice["sample_rate"]  # type: ignore[index]
        data = wav(sound, rate) if kind == "wav" else b"".join(pcm16(chunk) for chunk in sound)
        audio_id, expires_at = f"audio_{uuid.uuid4().hex[:24]}", service.transcripts.expiry()
        service.transcripts.add(audio_id, transcript, expires_at)
        return {"id": audio_id, "data": base64.b64encode(data).decode("ascii"), "expires_at": expires_at,
                "transcript": transcript}

    async def stream(http: HTTPRequest, parsed: GenerationRequest, chat: bool, head: dict[str, Any]) -> Any:
        submitted, pieces = await events(http, functools.partial(service.submit, parsed))
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return "data: " + json.dumps(head | {"object": kind, "choices": choices} | extra) + "\n\n"

        # Token records wait for the text they make (the detokeniser may hold text back) and travel with it.
        pending: list[list[TokenLogprob]] = [[] for _ in submitted]
        offsets = [Offsets(service.tokenizer, skip_special_tokens=True) for _ in submitted]
        bases = [0] * len(submitted)  # where each choice's generated text starts (after an echoed prompt)
        started = [False] * len(submitted)

        def logprobs(i: int) -> dict[str, Any] | None:
            records, pending[i] = pending[i], []
            if parsed.logprobs is None:
                return None
            if chat:
                return service.chat_logprobs(records)
            starts = [bases[i] + offsets[i].push(r.token) for r in records]
            return completion_logprobs(service.token_text, [r.token for r in records], records, starts)

        def choice(i: int, text: str | None, finish: str | None, role: bool = False,
                   delta: dict[str, Any] | None = None) -> dict[str, Any]:
            if not chat:
                return {"index": i, "text": text or "", "logprobs": logprobs(i), "finish_reason": finish}
            if delta is None:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            return {"index": i, "delta": delta, "logprobs": None if role else logprobs(i), "finish_reason": finish}

        # A reply that may call tools is held back from <tool_call> on and read whole at its end.
        calls = [ToolStream(parsed.tools) for _ in submitted] if parsed.tools is not None else None

        def echo(i: int) -> str:
            """The event that returns choice ``i``'s prompt (before its first piece: the prompt has been read)."""
            started[i] = True
            answer = service.completion_choice(parsed, i, submitted[i], prompt_only=True)
            bases[i] = len(answer["text"])
            return event([answer | {"finish_reason": None}])

        # A spoken reply's text and sound travel as delta.audio (transcript pieces, then base64 pcm16 data).
        audio_ids = [f"audio_{uuid.uuid4().hex[:24]}" for _ in submitted] if parsed.audio is not None else None

        def audio(i: int, **fields: Any) -> dict[str, Any]:
            return {"index": i, "delta": {"audio": {"id": audio_ids[i]} | fields}, "finish_reason": None}

        try:
            if chat:
                yield event([choice(i, "", None, role=True) for i in range(len(submitted))])
            async for arrived in pieces:
                for i, piece in _coalesce(arrived):
                    if piece is None and submitted[i].finish_reason == "error":
                        raise _failure(submitted)
                    if parsed.echo and not started[i]:
                        yield echo(i)
                    if isinstance(piece, TokenLogprob):
                        pending[i].append(piece)
                    elif isinstance(piece, str) and calls is not None:
                        content = calls[i].feed(piece)
                        if content is not None:
                            yield event([choice(i, content, None)])
                    elif isinstance(piece, str):
                        yield event([choice(i, piece, None) if audio_ids is None else audio(i, transcript=piece)])
                    elif piece is not None:
                        yield event([audio(i, data=base64.b64encode(pcm16(piece)).decode("ascii"))])
                    else:
                        if audio_ids is not None:
                            expires_at = service.transcripts.expiry()
                            service.transcripts.add(audio_ids[i], submitted[i].text, expires_at)
                            yield event([audio(i, expires_at=expires_at)])
                        finish = submitted[i].finish_reason
                        if calls is not None:
                            deltas, finish = calls[i].finish(finish)
                            for delta in deltas:
                                yield event([choice(i, None, None, delta=delta)])
                        yield event([choice(i, None if chat else "", finish)])
            if parsed.include_usage:
                yield event([], usage=_usage(parsed.prompt_tokens, submitted))
            yield "data: [DONE]\n\n"
        except APIError as err:  # the status line is sent already: the error travels as an event
            yield "data: " + json.dumps(err.body()) + "\n\n"
        finally:
            await pieces.aclose()  # cancels whatever is unfinished when the client went away

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/audio/speech")
    async def speech(request: HTTPRequest) -> Any:
        parsed = service.parse_speech(await read_body(request))
        rate = service.voice["sample_rate"]  # type: ignore[index]
        headers = {"X-Sample-Rate": str(rate)}
        submitted, pieces = await events(request, functools.partial(service.submit_speech, parsed.text))
        if parsed.format == "wav" and parsed.stream_format is None:  # whole, with the sizes in its header
            sound = []
            async for arrived in pieces:
                sound.extend(piece for _, piece in arrived if piece is not None)
            error = _failure(submitted)
            if error is not None:
                raise error
            return Response(wav(sound, rate), media_type=SPEECH_FORMATS["wav"], headers=headers)
        # Streamed: the response starts with the first sound, so that a failure before it is still an error status.
        first = await anext(pieces, None)
        if first is not None and any(piece is None for _, piece in first):
            error = _failure(submitted)
            if error is not None:
                await pieces.aclose()
                raise error

        async def chunks() -> AsyncIterator[bytes]:
            """The response's bytes as they are made: the WAV header (length unknown), then PCM."""
            try:
                if parsed.format == "wav":
                    yield wav_header(rate, None)
                arrived = first
                while arrived is not None:
                    for _, piece in arrived:
                        if piece is not None:
                            yield pcm16(piece)
                        elif submitted[0].finish_reason == "error":
                            raise _failure(submitted)  # after the status line: the client sees a cut stream
                    arrived = await anext(pieces, None)
            finally:
                await pieces.aclose()

        if parsed.stream_format != "sse":
            return StreamingResponse(chunks(), media_type=SPEECH_FORMATS[parsed.format], headers=headers)

        async def sse() -> AsyncIterator[str]:
            try:
                async for data in chunks():
                    yield "data: " + json.dumps({"type": "speech.audio.delta",
                                                 "audio": base64.b64encode(data).decode("ascii")}) + "\n\n"
                tokens = len(service.tokenizer.encode(parsed.text))
                usage = {"input_tokens": tokens, "output_tokens": 0, "total_tokens": tokens}
                yield "data: " + json.dumps({"type": "speech.audio.done", "usage": usage}) + "\n\n"
            except APIError as err:
                yield "data: " + json.dumps(err.body()) + "\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    return app
