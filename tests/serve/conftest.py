"""The server tests' shared fixtures: ``omnilm serve`` as a real process behind an API key (``served``), and a
factory of servers in this process (``serve``) for tests that put hooks on the served model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import small_model
from live_server import API_KEY, InProcess, free_port, start_process
from omnilm.model.hf import save_pretrained
from omnilm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Iterator[dict]:
    """A server for the module's tests: its port, model folder ("tiny-chat", context 128), model and process."""
    folder = tmp_path_factory.mktemp("served") / "tiny-chat"
    model = small_model("llama", vocab_size=tokenizer.vocab_size, max_seq_len=128)
    save_pretrained(model, folder, tokenizer=tokenizer)
    port = free_port()
    proc = start_process(folder, port, "--api-key", API_KEY)
    yield {"port": port, "folder": folder, "model": model.eval(), "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def serve(tmp_path: Path, tokenizer: Tokenizer) -> Iterator[Callable[..., InProcess]]:
    """``serve(**ServeConfig overrides)`` starts a server in this process over a tiny model (context 128), its
    engine in a thread (so tests can hook the model) unless ``engine_process=True``; every server started is
    stopped at the end of the test."""
    folder = save_pretrained(small_model("llama", vocab_size=tokenizer.vocab_size, max_seq_len=128),
                             tmp_path / "tiny", tokenizer=tokenizer)
    started: list[InProcess] = []

    def start(**overrides: object) -> InProcess:
        started.append(InProcess(folder, **({"engine_process": False} | overrides)))
        return started[-1]

    yield start
    for server in started:
        server.stop()
