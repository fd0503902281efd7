"""Servers for the serving tests: ``omnilm serve`` as a real process, or the same app in this process (uvicorn in a
thread) where a test needs hooks on the served model (to make a step raise, or run slowly)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from helpers import solo_tokens
from omnilm.infer.sampling import SamplingParams

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, alive: object, timeout: float = 60) -> None:
    """Until something listens on ``port``; ``alive()`` false means the server died."""
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert alive() and time.time() < deadline, "the server did not start"  # type: ignore[operator]
            time.sleep(0.05)


def start_process(folder: Path, port: int, *args: str) -> subprocess.Popen:
    """``omnilm serve --model folder --port port args...`` as a child process, once it listens."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "omnilm.cli", "serve", "--model", str(folder), "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        wait_for_port(port, lambda: proc.poll() is None)
    except AssertionError:
        raise AssertionError(proc.stderr.read().decode()) from None
    return proc


class InProcess:
    """A server running in this process; ``stop`` ends it."""

    def __init__(self, folder: Path, **overrides: object) -> None:
        import uvicorn

        from omnilm.serve.server import Service, create_app

        self.service = Service(folder, **overrides)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()

    def slow_down(self, seconds: float) -> None:
        """Every forward pass of the served model takes ``seconds`` longer."""
        self.service.model.tok_emb.register_forward_pre_hook(lambda module, args: time.sleep(seconds))

    def post(self, body: dict, path: str = "/v1/completions") -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())

    def open_stream(self, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        return conn, response

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())

    def wait_idle(self, timeout: float = 2) -> dict:
        """/health once nothing runs or waits, or after ``timeout`` seconds (whatever it says then)."""
        deadline = time.time() + timeout
        while True:
            health = self.health()
            if health["running"] == 0 and health["waiting"] == 0 or time.time() > deadline:
                return health
            time.sleep(0.05)

    def expected_text(self, prompt: str, max_tokens: int) -> str:
        """The greedy completion of ``prompt`` computed here, independently of the server."""
        tokenizer, model = self.service.tokenizer, self.service.model
        with torch.inference_mode():
            tokens = solo_tokens(model, tokenizer.encode(prompt), SamplingParams(max_new_tokens=max_tokens,
                                                                                 temperature=0),
                                 self.service.engine.eos_ids)
        return tokenizer.decode(tokens, skip_special_tokens=True)
