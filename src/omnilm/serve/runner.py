"""Where the engine runs for the server: in a thread of the server process, or in a process of its own.

Both runners take requests from the HTTP handlers and call ``on_step`` after every engine step (the server then
wakes the handlers whose requests got text). In a thread, the engine and the event loop share one interpreter
lock, so under load every token's bookkeeping competes with HTTP work; in its own process (the default of
``omnilm serve``, as serving engines in the field do) the engine has an interpreter to itself and the server
process only relays text. The process is restarted when it dies: the requests it held fail with an error, the
next ones are served.

Protocol of the engine process (pickled tuples over a ``multiprocessing`` pipe):

- server → engine: ``("submit", [(id, prompt_ids, params, fields, scoring), ...])`` (``fields``: what a Thinker
  request adds, :func:`~omnilm.serve.thinker_engine.speech_fields`: its media arguments as numpy arrays, whether
  to speak the reply, text to say; ``scoring``: the log-probabilities to record, :func:`scoring_fields`; each None
  for a plain request), ``("cancel", [id, ...])``, ``("stop",)``;
- engine → server: ``("ready", max_len, eos_ids, voice)`` once (``voice``: :func:`voice_info`), then after every
  step ``("events", [(id, text piece) | (id, audio chunk) | (id, token record) | (id, None, finish_reason, error,
  output_ids, prompt_token_logprobs), ...], stats)``, an audio chunk being a float32 numpy array and a token
  record a :class:`~omnilm.serve.logprobs.TokenLogprob` (a sampled token's log-probabilities), which a request
  scoring its prompt precedes by the list of its prompt's records, ``(id, [record, ...])``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omnilm.errors import UserError
from omnilm.serve.config import ServeConfig
from omnilm.serve.engine import EngineUnavailable, QueueFull, Request, RequestQueue, check_context
from omnilm.serve.logprobs import TokenLogprob

log = logging.getLogger(__name__)

#: The name the served voice answers to when the voice does not name itself.
DEFAULT_VOICE = "default"


def voice_info(engine: RequestQueue) -> dict[str, Any] | None:
    """What the server needs to know of the engine's voice (None: the model writes text only): ``name`` and
    ``sample_rate``."""
    voice = getattr(engine, "voice", None)
    if voice is None:
        return None
    return {"name": str(getattr(voice, "name", None) or DEFAULT_VOICE), "sample_rate": int(voice.sample_rate)}


SCORING_FIELDS = ("logprobs", "prompt_logprobs", "prompt_only")


def scoring_fields(request: Request) -> dict[str, Any] | None:
    """The log-probabilities ``request`` asks the engine to record (to rebuild it in the engine process), or None."""
    fields = {name: getattr(request, name) for name in SCORING_FIELDS}
    return None if fields == {"logprobs": None, "prompt_logprobs": None, "prompt_only": False} else fields


def check_request(request: Request, max_len: int) -> None:
    """Raise ValueError for a request no engine of context ``max_len`` can serve (text to say has no prompt)."""
    if getattr(request, "say", None) is not None:
        return
    if not request.prompt_ids:
        raise ValueError("a request needs at least one prompt token")
    check_context(len(request.prompt_ids), request.params, max_len)


def build_engine(model_dir: str | Path, config: ServeConfig) -> RequestQueue:
    """The engine ``config`` describes for the model folder (a draft model makes it speculative; a thinker folder
    gets the Thinker's engine)."""
    from omnilm.omni.thinker import is_thinker_folder
    from omnilm.tokenizer.chat import IM_END

    if is_thinker_folder(model_dir):
        from omnilm.omni.speech import load_voice
        from omnilm.omni.thinker import load_thinker
        from omnilm.serve.thinker_engine import ThinkerEngine
        from omnilm.tokenizer import Tokenizer

        if config.draft_model is not None:
            raise UserError("a draft model cannot serve a Thinker (speculative decoding is for text models)")
        thinker, tokenizer = load_thinker(model_dir), Tokenizer.from_dir(model_dir)
        thinker_engine = ThinkerEngine(thinker, tokenizer, max_queue=config.max_queue,
                                       voice=load_voice(model_dir, thinker, tokenizer))  # None without talker/
        im_end = thinker_engine.tokenizer.token_to_id(IM_END)
        if im_end is not None:
            thinker_engine.eos_ids.add(im_end)
        return thinker_engine

    from omnilm.infer.text import TextGenerator

    generator = TextGenerator.from_pretrained(model_dir)
    engine: RequestQueue
    if config.draft_model is not None or config.mtp:
        from omnilm.infer.mtp_draft import MTPDrafter
        from omnilm.serve.speculative_engine import SpeculativeEngine

        if config.mtp:  # the heads beside the model folder draft
            from omnilm.model.mtp import load_heads

            draft = MTPDrafter(generator.model, load_heads(model_dir, generator.model))
        else:
            draft = TextGenerator.from_pretrained(config.draft_model).model
        engine = SpeculativeEngine(generator.model, draft, generator.tokenizer, config.speculative_k,
                                   max_queue=config.max_queue)
    else:
        from omnilm.serve.engine import Engine

        engine = Engine(generator.model, generator.tokenizer, kv_budget_bytes=config.kv_budget_mb << 20,
                        block_size=config.block_size, max_batch=config.max_batch, prefill_chunk=config.prefill_chunk,
                        max_queue=config.max_queue)
    im_end = generator.tokenizer.token_to_id(IM_END)
    if im_end is not None:  # a chat reply ends with its turn
        engine.eos_ids.add(im_end)
    return engine


class ThreadRunner:
    """The engine in a thread of this process (``engine`` and its model stay reachable, e.g. for tests)."""

    def __init__(self, engine: RequestQueue, on_step: Callable[[], None]) -> None:
        self.engine, self.on_step = engine, on_step
        self.max_len, self.eos_ids = engine.max_len, engine.eos_ids
        self.voice = voice_info(engine)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="omnilm-engine")
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            if not self.engine.busy:
                self.wake.wait(0.05)
                self.wake.clear()
            else:
                try:
                    self.engine.step()
                except Exception:  # noqa: BLE001 - the engine thread must outlive any fault
                    log.exception("engine step failed outside a request; failing the running requests")
                    self.engine.fail(self.engine.active(), "internal error in the engine (see the server log)")
            self.on_step()

    def submit_all(self, requests: Sequence[Request]) -> None:
        self.engine.submit_all(requests)
        self.wake.set()

    def fail(self, requests: Sequence[Request], error: str | None) -> None:
        self.engine.fail(requests, error)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping.is_set()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        self.engine.fail(self.engine.active() + list(self.engine.waiting), None)


def _worker(conn: Any, model_dir: str, config: ServeConfig) -> None:
    """The engine process: build the engine, then alternate between the pipe and engine steps."""
    import torch

    engine = build_engine(model_dir, config)
    events: list[tuple[Any, ...]] = []
    requests: dict[int, Request] = {}

    def track(ident: int, prompt_ids: list[int], params: Any, fields: dict[str, Any] | None,
              scoring: dict[str, Any] | None) -> Request:
        def finished() -> None:
            request = requests.pop(ident)
            events.append((ident, None, request.finish_reason, request.error, request.output_ids,
                           request.prompt_token_logprobs))

        def text(piece: str) -> None:
            events.append((ident, piece))

        def relay(item: Any) -> None:  # an audio chunk or a token's log-probabilities
            events.append((ident, item))

        request: Request
        if fields is None:
            request = Request(prompt_ids, params, text, finished)
        else:
            from omnilm.serve.thinker_engine import ThinkerRequest

            request = ThinkerRequest(prompt_ids, params, text, finished, on_audio=relay, **fields)
        if scoring is not None:
            for name, value in scoring.items():
                setattr(request, name, value)

            def sampled(record: Any) -> None:
                if len(request.token_logprobs) == 1 and request.prompt_logprobs is not None:
                    relay(list(request.prompt_token_logprobs))  # the prompt is read: its records go first
                relay(record)

            request.on_logprob = sampled
        requests[ident] = request
        return request

    conn.send(("ready", engine.max_len, sorted(engine.eos_ids), voice_info(engine)))
    with torch.inference_mode():
        while True:
            timeout = 0.0 if engine.busy else 0.05
            while conn.poll(timeout):
                message = conn.recv()
                if message[0] == "stop":
                    return
                if message[0] == "submit":
                    batch = [track(*item) for item in message[1]]
                    try:
                        engine.submit_all(batch)
                    except (QueueFull, ValueError) as err:  # checked by the server first; answered, never lost
                        for request in batch:
                            request._end("error", str(err))
                else:
                    engine.fail([requests[i] for i in message[1] if i in requests], None)
                timeout = 0.0
            if engine.busy:
                engine.step()
            if events or not engine.busy:
                conn.send(("events", events, engine.stats()))
                events = []


class ProcessRunner:
    """The engine in a child process; this object stands in for it (validation, queue bound, bookkeeping)."""

    def __init__(self, model_dir: str | Path, config: ServeConfig, on_step: Callable[[], None]) -> None:
        self.model_dir, self.config, self.on_step = str(model_dir), config, on_step
        self.requests: dict[int, Request] = {}
        self.lock = threading.Lock()
        self.latest: dict[str, Any] = {"running": 0, "waiting": 0}
        self.stopping = self.restarting = False
        self._start()
        self.reader = threading.Thread(target=self._read, daemon=True, name="omnilm-engine-reader")
        self.reader.start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, self.model_dir, self.config), daemon=True,
                                       name="omnilm-engine")
        self.process.start()
        child.close()
        try:
            _, self.max_len, eos_ids, self.voice = self.conn.recv()
        except EOFError:
            self.process.join(timeout=30)
            raise UserError(f"the engine process exited (code {self.process.exitcode}) before it was ready; "
                            "its error is above") from None
        self.eos_ids = set(eos_ids)

    def _read(self) -> None:
        while not self.stopping:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                if self.stopping:
                    return
                self._restart()
                continue
            _, events, stats = message
            for event in events:
                request = self.requests.get(event[0])
                if request is None:
                    continue
                if isinstance(event[1], str):
                    request._emit(event[1])
                elif isinstance(event[1], TokenLogprob):
                    request._emit_logprob(event[1])
                elif isinstance(event[1], list):
                    request.prompt_token_logprobs[:] = event[1]
                elif event[1] is not None:
                    request._emit_audio(event[1])  # type: ignore[attr-defined]  # only Thinker requests speak
                else:
                    del self.requests[event[0]]
                    request.output_ids[:] = event[4]
                    request.prompt_token_logprobs[:] = event[5]
                    request._end(event[2], event[3])
            self.latest = stats
            self.on_step()

    def _restart(self) -> None:
        self.process.join(timeout=5)
        log.error("the engine process died (exit code %s); restarting it", self.process.exitcode)
        with self.lock:
            self.restarting = True
            lost, self.requests = list(self.requests.values()), {}
            self.latest = {"running": 0, "waiting": 0}
        for request in lost:
            request._end("error", "the engine process died while serving this request; it has been restarted")
        self.on_step()
        self._start()
        with self.lock:
            self.restarting = False

    def submit_all(self, requests: Sequence[Request]) -> None:
        from omnilm.serve.thinker_engine import speech_fields

        for request in requests:
            check_request(request, self.max_len)
        with self.lock:
            if self.restarting:
                raise EngineUnavailable("the engine is restarting after a fault; retry in a moment")
            waiting = len(self.requests) - self.latest.get("running", 0)
            if waiting + len(requests) > self.config.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (at most {self.config.max_queue})")
            for request in requests:
                self.requests[request.request_id] = request
            self.conn.send(("submit", [(r.request_id, r.prompt_ids, r.params, speech_fields(r), scoring_fields(r))
                                       for r in requests]))

    def fail(self, requests: Sequence[Request], error: str | None) -> None:
        with self.lock:
            for request in requests:
                self.requests.pop(request.request_id, None)
            with contextlib.suppress(OSError):  # a dead engine holds nothing any more
                self.conn.send(("cancel", [r.request_id for r in requests]))
        for request in requests:
            request._end("cancelled" if error is None else "error", error)

    def stats(self) -> dict[str, Any]:
        stats = dict(self.latest)
        stats["waiting"] = max(0, len(self.requests) - stats.get("running", 0))
        return stats

    @property
    def alive(self) -> bool:
        return self.process.is_alive() and not self.stopping

    def close(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
        self.fail(list(self.requests.values()), None)
