"""The OpenAI-compatible server as a real process, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import http.client
import json

import pytest

from live_server import API_KEY
from omnilm.infer.generate import FINISHED, generate_ids
from omnilm.infer.sampling import SamplingParams
from omnilm.tokenizer import Tokenizer
from omnilm.tokenizer.chat import IM_END, format_chat


def client(served: dict, key: str = API_KEY):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{served['port']}/v1", api_key=key, max_retries=0)


def greedy(served: dict, tokenizer: Tokenizer, prompt: str, max_tokens: int, chat: bool) -> str:
    """The reply computed in this process, independently of the server."""
    ids = tokenizer.encode(prompt)
    stops = {tokenizer.eos_id} | ({tokenizer.token_to_id(IM_END)} if chat else set())
    out = []
    for step in generate_ids(served["model"], [ids], SamplingParams(max_new_tokens=max_tokens, temperature=0),
                             sorted(stops), 0):
        token = int(step[0])
        if token == FINISHED or token in stops:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_models_health_and_completions(served: dict, tokenizer: Tokenizer) -> None:
    api = client(served)
    assert [m.id for m in api.models.list().data] == ["tiny-chat"]
    messages = [{"role": "user", "content": "Alice was born in"}]
    reply = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    expected = greedy(served, tokenizer, format_chat(messages, add_generation_prompt=True), 12, chat=True)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    prompt_tokens = len(tokenizer.encode(format_chat(messages, add_generation_prompt=True)))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    text = api.completions.create(model="tiny-chat", prompt="The quick brown", max_tokens=10, temperature=0)
    assert text.choices[0].text == greedy(served, tokenizer, "The quick brown", 10, chat=False)
    assert text.usage.completion_tokens == 10 and text.choices[0].finish_reason == "length"
    several = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, n=3, seed=1,
                                          temperature=1.0)
    again = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, n=3, seed=1,
                                        temperature=1.0)
    texts = [c.message.content for c in several.choices]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) == 3  # seeded, and distinct
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


def test_streaming_matches_non_streaming(served: dict) -> None:
    api = client(served)
    messages = [{"role": "user", "content": "Bob studied"}]
    whole = api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0)
    chunks = list(api.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    stream = api.completions.create(model="tiny-chat", prompt="Emoji", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == api.completions.create(
        model="tiny-chat", prompt="Emoji", max_tokens=6, temperature=0).choices[0].text


def test_errors_are_openai_style_and_the_server_keeps_serving(served: dict) -> None:
    import openai

    api = client(served)
    bad = [({"messages": [{"role": "robot", "content": "x"}]}, 400, "unknown role"),
           ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
           ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
           ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "context"),
           ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context"),
           ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist")]
    for body, status, words in bad:
        with pytest.raises(openai.APIStatusError) as err:
            api.chat.completions.create(**({"model": "tiny-chat"} | body))
        assert err.value.status_code == status and words in err.value.message, body
    with pytest.raises(openai.BadRequestError, match="messages is required"):
        api.chat.completions.create(model="tiny-chat", messages=openai.NOT_GIVEN)
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").models.list()

    def raw(body: bytes) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=10)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    status, body = raw(b'{"messages": [')
    assert status == 400 and "invalid JSON" in body["error"]["message"]
    status, body = raw(b'{"messages": "' + b"x" * (2 << 20) + b'"}')
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    reply = api.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "still there?"}],
                                        max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_api_key_can_come_from_the_environment(tmp_path, tokenizer: Tokenizer) -> None:  # noqa: ANN001
    import os

    from helpers import small_model
    from live_server import free_port, start_process
    from omnilm.model.hf import save_pretrained

    folder = save_pretrained(small_model("llama", vocab_size=tokenizer.vocab_size), tmp_path / "m", tokenizer=tokenizer)
    port = free_port()
    os.environ["OMNILM_API_KEY"] = "from-the-environment"
    try:
        proc = start_process(folder, port)
    finally:
        del os.environ["OMNILM_API_KEY"]
    try:
        assert "from-the-environment" not in " ".join(proc.args)

        def status(key: str | None) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
            return conn.getresponse().status

        assert status(None) == 401 and status("from-the-environmen") == 401 and status("wrong") == 401
        assert status("from-the-environment") == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
