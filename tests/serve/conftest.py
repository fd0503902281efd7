"""The server tests' shared fixture: ``omnilm serve`` as a real process over a tiny chat model, behind an API key."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from helpers import small_model
from omnilm.model.hf import save_pretrained
from omnilm.tokenizer import Tokenizer

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Iterator[dict]:
    """A server for the module's tests: its port, model folder ("tiny-chat", context 128), model and process."""
    folder = tmp_path_factory.mktemp("served") / "tiny-chat"
    model = small_model("llama", vocab_size=tokenizer.vocab_size, max_seq_len=128)
    save_pretrained(model, folder, tokenizer=tokenizer)
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "omnilm.cli", "serve", "--model", str(folder), "--port", str(port),
                             "--api-key", API_KEY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
            time.sleep(0.1)
    yield {"port": port, "folder": folder, "model": model.eval(), "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)
