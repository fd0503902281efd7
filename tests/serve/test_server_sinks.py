"""``omnilm serve --attention-sinks K --sink-window W``: replies stream past the context, equal to ``generate`` with
the same settings, through the official openai client; bad settings are a 400 (or refused at start)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import small_model, solo_tokens
from live_server import free_port, start_process
from omnilm.errors import UserError
from omnilm.infer.sampling import SamplingParams
from omnilm.model.hf import save_pretrained
from omnilm.serve.server import APIError, Service
from omnilm.tokenizer import Tokenizer
from omnilm.tokenizer.chat import IM_END

CONTEXT = 64


@pytest.fixture(scope="module")
def streaming(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Iterator[dict]:
    """A server process of a 64-position model that streams every request with 4 sinks and a 24-token window."""
    folder = tmp_path_factory.mktemp("sinks") / "tiny"
    model = small_model("llama", vocab_size=tokenizer.vocab_size, max_seq_len=CONTEXT)
    save_pretrained(model, folder, tokenizer=tokenizer)
    port = free_port()
    proc = start_process(folder, port, "--attention-sinks", "4", "--sink-window", "24")
    yield {"port": port, "folder": folder, "model": model.eval()}
    proc.terminate()
    proc.wait(timeout=30)


def client(port: int):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def expected(streaming: dict, tokenizer: Tokenizer, prompt: str, n: int, sinks: int, window: int) -> str:
    eos = {tokenizer.eos_id, tokenizer.token_to_id(IM_END)} - {None}
    params = SamplingParams(max_new_tokens=n, temperature=0, attention_sinks=sinks, sink_window=window)
    return tokenizer.decode(solo_tokens(streaming["model"], tokenizer.encode(prompt), params, eos),
                            skip_special_tokens=True)


def test_replies_run_past_the_context_and_equal_generate(streaming: dict, tokenizer: Tokenizer) -> None:
    api = client(streaming["port"])
    whole = api.completions.create(model="tiny", prompt="Alice Moreau was born", max_tokens=3 * CONTEXT,
                                   temperature=0)
    assert whole.choices[0].text == expected(streaming, tokenizer, "Alice Moreau was born", 3 * CONTEXT, 4, 24)
    assert whole.usage.completion_tokens == 3 * CONTEXT or whole.choices[0].finish_reason == "stop"
    chunks = api.completions.create(model="tiny", prompt="Bob Lindqvist", max_tokens=150, temperature=0, stream=True,
                                    extra_body={"attention_sinks": 2, "sink_window": 10})
    assert "".join(c.choices[0].text for c in chunks) == expected(streaming, tokenizer, "Bob Lindqvist", 150, 2, 10)


def test_bad_sink_settings_are_400(streaming: dict) -> None:
    import openai

    api = client(streaming["port"])
    for extra, message in [({"sink_window": 60}, "must fit the context of 64"),
                           ({"attention_sinks": -1}, "attention_sinks must be an integer"),
                           ({"attention_sinks": "4"}, "attention_sinks must be an integer"),
                           ({"attention_sinks": 0}, "exceeds the context"),  # no sinks: the context bounds again
                           ({"attention_sinks": 0, "sink_window": 8}, "sink_window needs attention_sinks")]:
        with pytest.raises(openai.BadRequestError, match=message):
            api.completions.create(model="tiny", prompt="Alice", max_tokens=100, extra_body=extra)
    reply = api.completions.create(model="tiny", prompt="Alice", max_tokens=3)  # still serving
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_servers_that_cannot_stream_with_sinks_say_so(streaming: dict) -> None:
    folder: Path = streaming["folder"]
    with pytest.raises(UserError, match="must fit the context of 64"):
        Service(folder, engine_process=False, attention_sinks=4, sink_window=64)
    with pytest.raises(UserError, match="needs --attention-sinks"):
        Service(folder, engine_process=False, sink_window=8)
    with pytest.raises(UserError, match="speculative engine"):
        Service(folder, engine_process=False, draft_model=str(folder), attention_sinks=4)
    service = Service(folder, engine_process=False, draft_model=str(folder))
    try:
        with pytest.raises(APIError, match="not available from this server") as err:
            service.parse({"prompt": "Alice", "attention_sinks": 2}, chat=False)
        assert err.value.status == 400
    finally:
        service.close()
