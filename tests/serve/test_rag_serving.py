"""``omnilm serve --rag DIR --top-k K``: chat requests are answered as if their last user turn had been sent with
its retrieved passages (the documented template); completions are untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from live_server import InProcess
from omnilm.errors import UserError
from omnilm.rag.index import RagIndex
from omnilm.rag.prompt import render_context

PASSAGES = [{"text": "Ann Lee was born in Lyon.", "person_id": 0},
            {"text": "Bob Stone works in Oslo.", "person_id": 1}]


def client(server: InProcess):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def reply(server: InProcess, messages: list[dict]) -> str:
    out = client(server).chat.completions.create(model=server.service.name, messages=messages, max_tokens=8,
                                                 temperature=0)
    return out.choices[0].message.content


def test_chat_requests_get_their_passages(serve: Callable[..., InProcess], tmp_path: Path) -> None:
    index = RagIndex.build(PASSAGES).save(tmp_path / "idx")
    plain, rag = serve(), serve(rag=str(index), rag_top_k=2)
    question = [{"role": "user", "content": "Where was Ann Lee born?"}]
    assert reply(rag, question) == reply(plain, [{"role": "user", "content": render_context(
        "Where was Ann Lee born?", [PASSAGES[0]["text"]])}])
    # Earlier turns stay as sent; a question sharing no term with any passage says so.
    turns = [*question, {"role": "assistant", "content": "Lyon"}, {"role": "user", "content": "Who is Zed?"}]
    assert reply(rag, turns) == reply(plain, turns[:2] + [{"role": "user",
                                                           "content": render_context("Who is Zed?", [])}])
    prompt = "Where was Ann Lee born?"
    completions = [client(s).completions.create(model=s.service.name, prompt=prompt, max_tokens=6, temperature=0)
                   for s in (plain, rag)]
    assert completions[0].choices[0].text == completions[1].choices[0].text


def test_a_bad_index_fails_at_start(serve: Callable[..., InProcess], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a retrieval index"):
        serve(rag=str(tmp_path))
    index = RagIndex.build(PASSAGES).save(tmp_path / "idx")
    with pytest.raises(UserError, match="rag_top_k"):
        serve(rag=str(index), rag_top_k=0)
