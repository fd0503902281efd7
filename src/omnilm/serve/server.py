"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both also streaming as server-sent events,
with ``stream_options.include_usage``), ``GET /v1/models``, ``GET /health`` and ``GET /`` (a small web chat).
Bad requests get OpenAI-style error objects with a 4xx status and the server keeps serving; a client that
disconnects from a stream cancels its request. One background thread runs the engine; request handlers only
submit requests and wait for their text.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from omnilm.errors import UserError
from omnilm.infer.sampling import SamplingParams
from omnilm.serve.engine import Engine, Request
from omnilm.tokenizer.chat import IM_END, format_chat, validate_messages

MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 8


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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


class Service:
    """The model, its tokenizer and the engine thread behind the HTTP routes."""

    def __init__(self, model_dir: str | Path, model_name: str | None = None, kv_budget_bytes: int = 256 << 20,
                 draft_dir: str | Path | None = None, speculative_k: int = 4) -> None:
        from omnilm.infer.text import TextGenerator

        generator = TextGenerator.from_pretrained(model_dir)
        self.model, self.tokenizer = generator.model, generator.tokenizer
        self.name = model_name or Path(model_dir).resolve().name
        self.context = self.model.config.max_seq_len
        if draft_dir is not None:
            from omnilm.serve.speculative_engine import SpeculativeEngine

            draft = TextGenerator.from_pretrained(draft_dir).model
            self.engine = SpeculativeEngine(self.model, draft, self.tokenizer, speculative_k)
        else:
            self.engine = Engine(self.model, self.tokenizer, kv_budget_bytes=kv_budget_bytes)
        im_end = self.tokenizer.token_to_id(IM_END)
        if im_end is not None:
            self.engine.eos_ids.add(im_end)
        self.wake = threading.Event()
        self.created = int(time.time())
        threading.Thread(target=self._loop, daemon=True, name="omnilm-engine").start()

    def _loop(self) -> None:
        while True:
            if self.engine.busy:
                self.engine.step()
            else:
                self.wake.wait(0.05)
                self.wake.clear()

    def parse(self, body: dict[str, Any], chat: bool) -> GenerationRequest:
        """Validate an OpenAI request body into a GenerationRequest (APIError on anything wrong)."""
        if body.get("model") not in (None, self.name):
            raise APIError(404, f"The model {body.get('model')!r} does not exist; this server serves {self.name!r}",
                           kind="invalid_request_error", param="model", code="model_not_found")
        if chat:
            if "messages" not in body:
                raise APIError(400, "messages is required", param="messages")
            try:
                messages = validate_messages(body["messages"])
            except UserError as err:
                raise APIError(400, str(err), param="messages") from err
            prompt = format_chat(messages, add_generation_prompt=True)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise APIError(400, "prompt must be a non-empty string", param="prompt")
        prompt_ids = self.tokenizer.encode(prompt)
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
        params = SamplingParams(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0, stop=tuple(stop),
                                seed=_integer(body, "seed", None, 0))
        return GenerationRequest(prompt_ids, params, _integer(body, "n", 1, 1), bool(body.get("stream", False)),
                                 bool(stream_options.get("include_usage", False)))

    def submit(self, request: GenerationRequest, on_text: Any = None, on_finish: Any = None) -> list[Request]:
        if request.n > MAX_CHOICES:
            raise APIError(400, f"n must be at most {MAX_CHOICES}", param="n")
        submitted = []
        for index in range(request.n):
            seed = None if request.params.seed is None else request.params.seed + index
            params = SamplingParams(**{**request.params.__dict__, "seed": seed})
            text_callback = None if on_text is None else (lambda piece, i=index: on_text(i, piece))
            finish_callback = None if on_finish is None else (lambda i=index: on_finish(i))
            submitted.append(self.engine.submit(Request(list(request.prompt_ids), params, text_callback,
                                                        finish_callback)))
        self.wake.set()
        return submitted

    def cancel(self, requests: list[Request]) -> None:
        for request in requests:
            if not request.done.is_set():
                self.engine.cancel(request)


def _usage(prompt_tokens: int, requests: list[Request]) -> dict[str, int]:
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def create_app(service: Service, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving ``service``."""
    app = FastAPI(title="omnilm", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next: Any) -> Any:
        if (api_key and request.url.path.startswith("/v1/")
                and request.headers.get("authorization", "") != f"Bearer {api_key}"):
            return JSONResponse(APIError(401, "invalid or missing API key", kind="authentication_error",
                                         code="invalid_api_key").body(), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return JSONResponse(APIError(413, f"request body larger than {max_body_bytes} bytes").body(),
                                status_code=413)
        return await call_next(request)

    async def read_body(request: HTTPRequest) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"request body larger than {max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"invalid JSON body: {err}") from err
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "omnilm"}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return resources.files("omnilm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    async def complete(request: HTTPRequest, chat: bool) -> Any:
        parsed = service.parse(await read_body(request), chat)
        kind = "chat.completion" if chat else "text_completion"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "created": int(time.time()), "model": service.name}
        if not parsed.stream:
            submitted = service.submit(parsed)
            try:
                for r in submitted:
                    await asyncio.to_thread(r.done.wait)
            except asyncio.CancelledError:
                service.cancel(submitted)
                raise
            choices = [{"index": i, "finish_reason": r.finish_reason,
                        **({"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text})}
                       for i, r in enumerate(submitted)]
            return head | {"object": kind, "choices": choices,
                           "usage": _usage(len(parsed.prompt_ids), submitted)}
        return StreamingResponse(_stream(request, parsed, chat, head), media_type="text/event-stream")

    async def _stream(http: HTTPRequest, parsed: GenerationRequest, chat: bool, head: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        # Pieces and the end of each choice travel through one queue, so an end never overtakes its text.
        submitted = service.submit(parsed, lambda i, piece: loop.call_soon_threadsafe(queue.put_nowait, (i, piece)),
                                   lambda i: loop.call_soon_threadsafe(queue.put_nowait, (i, None)))
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
            finished = 0
            while finished < len(submitted):
                try:
                    i, piece = await asyncio.wait_for(queue.get(), timeout=0.1)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if piece is None:
                    finished += 1
                    yield event([choice(i, None if chat else "", submitted[i].finish_reason)])
                else:
                    yield event([choice(i, piece, None)])
            if parsed.include_usage:
                yield event([], usage=_usage(len(parsed.prompt_ids), submitted))
            yield "data: [DONE]\n\n"
        finally:
            service.cancel(submitted)  # a no-op for finished requests; frees the slots of abandoned ones

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await complete(request, chat=False)

    return app
