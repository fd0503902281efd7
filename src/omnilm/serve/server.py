"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both also streaming as server-sent events,
with ``stream_options.include_usage``), ``GET /v1/models``, ``GET /health`` (with the engine's load) and ``GET /``
(a web chat). The engine runs in a process of its own (or a thread, see :mod:`omnilm.serve.runner`); request handlers
only submit requests and relay their text.

What a client can rely on:

- a bad request gets an OpenAI-style error object with a 4xx status and the server keeps serving; a body over the
  limit is refused as soon as the limit is passed (also when sent chunked, without a length);
- when the waiting queue is full the answer is 429 with ``Retry-After``;
- a fault in the engine (an exception, non-finite logits) fails the requests it touched with a 500 error object,
  is logged with its traceback, and the engine goes on serving; an engine process that dies fails its requests
  and is restarted (503 with ``Retry-After`` meanwhile); every request ends within ``request_timeout_s``
  (504 after it), and a client that disconnects cancels its request, whose KV blocks are freed at once;
- message content is encoded as plain text: a special-token string in a message cannot forge a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from omnilm.errors import UserError
from omnilm.infer.sampling import SamplingParams
from omnilm.serve.config import ServeConfig
from omnilm.serve.engine import EngineUnavailable, QueueFull, Request, RequestQueue
from omnilm.tokenizer.chat import encode_chat, validate_messages

log = logging.getLogger(__name__)

MAX_CHOICES = 8


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


@dataclass
class GenerationRequest:
    """A validated completion request: prompt token ids and how to sample ``n`` choices."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool


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


def _integer(body: dict[str, Any], key: str, default: int | None, low: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"{key} must be an integer of at least {low}, got {json.dumps(value)}", param=key)
    return value


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


class Channel:
    """The events of one HTTP request, from the engine thread to its handler on the event loop.

    The engine appends ``(choice, text piece)`` pairs, ``(choice, None)`` at a choice's end, without blocking; the
    handler is woken once per engine step (``Service.flush``) however many events arrived, and takes them all at
    once. (One wake-up per token from another thread costs a system call and a task switch each, which under
    load competes with the engine for the interpreter.)
    """

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        self.service, self.loop = service, loop
        self.items: deque[tuple[int, str | None]] = deque()
        self.waiter: asyncio.Future | None = None

    def push(self, item: tuple[int, str | None]) -> None:
        """Called from any thread."""
        self.items.append(item)
        self.service.notify(self)

    def wake(self) -> None:
        """Called on the event loop."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self, timeout: float) -> list[tuple[int, str | None]]:
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
        from omnilm.serve.runner import ProcessRunner, ThreadRunner, build_engine
        from omnilm.tokenizer import Tokenizer

        self.config = dataclasses.replace(config or ServeConfig(), **overrides)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        model_config = read_config(model_dir)
        self.name = model_name or Path(model_dir).resolve().name
        self.context = model_config.max_seq_len
        if self.config.draft_model is not None:
            check_draft(model_config, self.tokenizer, read_config(self.config.draft_model),
                        Tokenizer.from_dir(self.config.draft_model))
        self.dirty: set[Channel] = set()
        self.dirty_lock = threading.Lock()
        self.created = int(time.time())
        self.runner: ThreadRunner | ProcessRunner
        if self.config.engine_process:
            self.runner = ProcessRunner(model_dir, self.config, self.flush)
        else:
            self.runner = ThreadRunner(build_engine(model_dir, self.config), self.flush)

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
        if chat:
            if "messages" not in body:
                raise APIError(400, "messages is required", param="messages")
            try:
                prompt_ids, _ = encode_chat(self.tokenizer, validate_messages(body["messages"]),
                                            add_generation_prompt=True)
            except UserError as err:
                raise APIError(400, str(err), param="messages") from err
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise APIError(400, "prompt must be a non-empty string", param="prompt")
            prompt_ids = self.tokenizer.encode(prompt)  # a raw prompt is the client's whole text, markup included
        if len(prompt_ids) >= self.context:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        room = self.context - len(prompt_ids)
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = _integer(body, key, min(room, 256), 1)
        if max_tokens > room:
            raise APIError(400, f"{key}={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds the "
                           f"context of {self.context}", param=key, code="context_length_exceeded")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        n = _integer(body, "n", 1, 1)
        if n > MAX_CHOICES:
            raise APIError(400, f"n must be at most {MAX_CHOICES}", param="n")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=tuple(stop),
                                seed=_integer(body, "seed", None, 0))
        return GenerationRequest(prompt_ids, params, n, bool(body.get("stream", False)),
                                 bool(stream_options.get("include_usage", False)))

    def submit(self, request: GenerationRequest, on_text: Any = None, on_finish: Any = None) -> list[Request]:
        """Queue the ``n`` choices of ``request`` (all or none: 429 when the queue cannot take them)."""
        choices = []
        for index in range(request.n):
            seed = None if request.params.seed is None else request.params.seed + index
            params = SamplingParams(**{**request.params.__dict__, "seed": seed})
            text_callback = None if on_text is None else (lambda piece, i=index: on_text(i, piece))
            finish_callback = None if on_finish is None else (lambda i=index: on_finish(i))
            choices.append(Request(list(request.prompt_ids), params, text_callback, finish_callback))
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


def _coalesce(events: list[tuple[int, str | None]]) -> list[tuple[int, str | None]]:
    """Adjacent text pieces of the same choice joined into one (one streamed event instead of several)."""
    out: list[tuple[int, str | None]] = []
    for index, piece in events:
        if piece is not None and out and out[-1][0] == index and out[-1][1] is not None:
            out[-1] = (index, out[-1][1] + piece)
        else:
            out.append((index, piece))
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
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "omnilm", "max_model_len": service.context}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return resources.files("omnilm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    async def events(http: HTTPRequest, parsed: GenerationRequest) -> tuple[list[Request], AsyncIterator]:
        """Submit ``parsed``; return its choices and an iterator of lists of (choice, text piece or None at its end).

        The iterator ends early (and cancels what is left) when the client disconnects, and raises the 504
        APIError when the request runs past the server's timeout.
        """
        loop = asyncio.get_running_loop()
        channel = Channel(service, loop)
        # Pieces and the end of each choice travel through one channel, so an end never overtakes its text.
        submitted = service.submit(parsed, lambda i, piece: channel.push((i, piece)),
                                   lambda i: channel.push((i, None)))
        deadline = loop.time() + service.config.request_timeout_s

        async def iterate() -> AsyncIterator[list[tuple[int, str | None]]]:
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
        parsed = service.parse(await read_body(request), chat)
        kind = "chat.completion" if chat else "text_completion"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "created": int(time.time()), "model": service.name}
        if parsed.stream:
            return StreamingResponse(stream(request, parsed, chat, head), media_type="text/event-stream")
        submitted, pieces = await events(request, parsed)
        async for _ in pieces:
            pass
        error = _failure(submitted)
        if error is not None:
            raise error
        choices = [{"index": i, "finish_reason": r.finish_reason,
                    **({"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text})}
                   for i, r in enumerate(submitted)]
        return head | {"object": kind, "choices": choices, "usage": _usage(len(parsed.prompt_ids), submitted)}

    async def stream(http: HTTPRequest, parsed: GenerationRequest, chat: bool, head: dict[str, Any]) -> Any:
        submitted, pieces = await events(http, parsed)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return "data: " + json.dumps(head | {"object": kind, "choices": choices} | extra) + "\n\n"

        def choice(i: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": i, "text": text or "", "finish_reason": finish}
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            return {"index": i, "delta": delta, "finish_reason": finish}

        try:
            if chat:
                yield event([choice(i, "", None, role=True) for i in range(len(submitted))])
            async for arrived in pieces:
                for i, piece in _coalesce(arrived):
                    if piece is not None:
                        yield event([choice(i, piece, None)])
                    elif submitted[i].finish_reason == "error":
                        raise _failure(submitted)
                    else:
                        yield event([choice(i, None if chat else "", submitted[i].finish_reason)])
            if parsed.include_usage:
                yield event([], usage=_usage(len(parsed.prompt_ids), submitted))
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

    return app
