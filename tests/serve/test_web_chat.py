"""The web chat page served at ``/``, driven in headless Chromium (Debian's ``chromium``) through Playwright.

The browser tests are skipped where Chromium or Playwright is missing. They save screenshots of the page, light and
dark, under the test's ``tmp_path``, and also into the folder named by the environment variable ``OMNILM_ARTIFACTS``
when it is set (so a CI run can keep them).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chromium import TIMEOUT_MS, chromium
from live_server import API_KEY

STATS = re.compile(r"^(Stopped · )?(TTFT \d+ ms · )?(\d+\.\d tok/s · )?(\d+) tokens?$")


def test_web_chat_page_is_served(served: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=10)
    conn.request("GET", "/")  # the page itself needs no API key
    response = conn.getresponse()
    page = response.read().decode()
    assert response.status == 200 and response.getheader("content-type").startswith("text/html")
    assert "/v1/chat/completions" in page and "/v1/models" in page
    assert all(f'id="{name}"' in page for name in ("reset", "stop", "send", "temperature", "top_p", "max_tokens",
                                                   "system", "api_key"))
    # Everything is in the one file: no script, style sheet or font from elsewhere.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "@import" not in page
    assert ".innerHTML" not in page and "insertAdjacentHTML" not in page


def completion(served: dict, body: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed chat completion for ``body``, asked directly (the reference for what the page shows)."""
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return json.loads(response.read())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Any, served: dict) -> Iterator[Any]:
    """A fresh browser context (empty localStorage) on the chat page; fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1120, "height": 760})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"http://127.0.0.1:{served['port']}/")
    yield page
    context.close()
    assert not errors, errors


def enter_key(page: Any) -> None:
    page.fill("#api_key", API_KEY)
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-chat'")


def messages(page: Any) -> list[dict[str, Any]]:
    """What the log shows: one dict per message."""
    return page.eval_on_selector_all("#log .msg", """boxes => boxes.map(b => ({
        role: b.classList.contains('user') ? 'user' : 'assistant', error: b.classList.contains('error'),
        content: b.querySelector('.content').textContent, stopped: b.dataset.stopped === 'true',
        streaming: b.dataset.streaming === 'true', stats: b.querySelector('.stats')?.textContent ?? null}))""")


def wait_idle(page: Any, count: int) -> None:
    """Wait until the log holds ``count`` messages and none is streaming."""
    page.wait_for_function("n => document.querySelectorAll('#log .msg').length === n"
                           " && !document.querySelector('#log [data-streaming]')", arg=count)


def say(page: Any, text: str) -> dict[str, Any]:
    """Type ``text``, send it with Enter, wait for the whole reply; the request body the page sent."""
    before = len(messages(page))
    page.fill("#input", text)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.press("#input", "Enter")
    wait_idle(page, before + 2)
    assert request.value.headers.get("authorization") == f"Bearer {API_KEY}"
    return request.value.post_data_json


def set_controls(page: Any, **values: str) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", value)


def tokens_of(stats: str) -> int:
    match = STATS.match(stats)
    assert match, stats
    return int(match.group(4))


def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("OMNILM_ARTIFACTS"):
        folder = Path(os.environ["OMNILM_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def test_model_name_and_context_need_the_api_key(page: Any) -> None:
    # The server was started with an API key, and this browser has none yet.
    page.wait_for_function("document.getElementById('model-status').textContent.includes('API key')")
    assert "needs an API key" in page.text_content("#model-status") and page.text_content("#model-name") == ""
    page.fill("#api_key", "wrong-key")
    page.wait_for_function("document.getElementById('model-status').textContent.includes('refused')")
    enter_key(page)
    assert page.text_content("#model-context") == "context 128 tokens"
    assert page.text_content("#model-status") == ""
    assert page.title() == "tiny-chat · omnilm chat"
    # Without a stored choice, max tokens defaults to a quarter of the context; the field cannot exceed the context.
    assert page.input_value("#max_tokens") == "32" and page.get_attribute("#max_tokens", "max") == "127"
    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-chat'")
    assert page.input_value("#api_key") == API_KEY  # kept in localStorage


def test_controls_reach_the_request_and_the_reply_is_the_servers(page: Any, served: dict) -> None:
    enter_key(page)
    set_controls(page, system="Answer briefly.", temperature="0", top_p="0.9", max_tokens="24")
    # Shift+Enter is a new line in the message, not a send.
    page.fill("#input", "Hello")
    page.press("#input", "Shift+Enter")
    page.locator("#input").press_sequentially("there")
    assert page.input_value("#input") == "Hello\nthere" and messages(page) == []
    page.fill("#input", "")
    body = say(page, "Hello\nthere")
    assert body["messages"] == [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "Hello\nthere"}]
    assert body["temperature"] == 0 and body["top_p"] == 0.9 and body["max_tokens"] == 24
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "tiny-chat"
    user, reply = messages(page)
    assert user == {"role": "user", "error": False, "content": "Hello\nthere", "stopped": False, "streaming": False,
                    "stats": None}
    # Greedy decoding: the streamed reply the page assembled is the server's non-streamed answer, token for token.
    expected = completion(served, body)
    assert reply["content"] == expected["choices"][0]["message"]["content"] and not reply["stopped"]
    assert tokens_of(reply["stats"]) == expected["usage"]["completion_tokens"]
    assert reply["stats"].startswith("TTFT ") and " tok/s · " in reply["stats"]
    assert page.text_content("#log .msg.assistant .who") == "tiny-chat"
    # The next turn carries the conversation so far.
    set_controls(page, max_tokens="8")
    body = say(page, "Go on")
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][2]["content"] == reply["content"] and body["max_tokens"] == 8


def test_stop_ends_a_long_reply_and_the_server_keeps_answering(page: Any, served: dict, tmp_path: Path) -> None:
    enter_key(page)
    set_controls(page, temperature="0", max_tokens="90")
    full = completion(served, {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
                               "max_tokens": 90})
    assert full["usage"]["completion_tokens"] == 90  # a long reply: greedy runs to max tokens
    # The tiny model writes 90 tokens in a fraction of a second; a slow network makes the reply arrive slowly
    # enough to stop it half way, as a reader would a runaway reply.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")

    def network(bytes_per_second: int) -> None:
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                      "downloadThroughput": bytes_per_second,
                                                      "uploadThroughput": -1})

    first_text = "document.querySelector('#log [data-streaming] .content')?.textContent.length > 0"
    for how in ("button", "Escape"):
        page.click("#reset")
        network(1500)
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        page.wait_for_function(first_text)
        assert page.is_disabled("#send") and page.is_enabled("#stop")
        if how == "button":
            page.click("#stop")
        else:
            page.press("#input", "Escape")
        wait_idle(page, 2)
        network(-1)
        reply = messages(page)[1]
        assert reply["stopped"] and reply["stats"].startswith("Stopped · TTFT "), reply
        assert 0 < tokens_of(reply["stats"]) < 90
        assert full["choices"][0]["message"]["content"].startswith(reply["content"]) and reply["content"]
        assert page.is_enabled("#send") and page.is_disabled("#stop")
    # The stopped text stays in the conversation, and the server answers the next message in full.
    set_controls(page, max_tokens="16")
    body = say(page, "And then?")
    assert body["messages"][1] == {"role": "assistant", "content": reply["content"]}
    answer = messages(page)[3]
    assert not answer["stopped"] and not answer["error"] and answer["content"]
    assert answer["content"] == completion(served, body)["choices"][0]["message"]["content"]
    save_screenshot(page, tmp_path, "web_chat.png")


def test_text_stays_text_the_conversation_survives_reload_and_reset_clears_it(page: Any, tmp_path: Path) -> None:
    enter_key(page)
    set_controls(page, temperature="0", max_tokens="12", system="Be kind.")
    say(page, "<b>x</b> & <img src=x onerror=alert(1)>")
    shown = messages(page)
    assert shown[0]["content"] == "<b>x</b> & <img src=x onerror=alert(1)>"
    assert page.locator("#log b").count() == 0 and page.locator("#log img").count() == 0
    say(page, "Thanks")
    shown = messages(page)
    assert len(shown) == 4 and all(m["stats"] for m in shown[1::2])
    page.reload()
    page.wait_for_selector("#log .msg")
    assert messages(page) == shown
    assert page.input_value("#temperature") == "0" and page.input_value("#max_tokens") == "12"
    assert page.input_value("#system") == "Be kind."
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-chat'")
    # Dark mode follows the system preference: the page's background turns dark.
    page.emulate_media(color_scheme="dark")
    luminance = page.evaluate("""() => {
        const [r, g, b] = getComputedStyle(document.body).backgroundColor.match(/\\d+/g).map(Number);
        return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255; }""")
    assert luminance < 0.2
    save_screenshot(page, tmp_path, "web_chat_dark.png")
    page.emulate_media(color_scheme="light")
    page.click("#reset")
    assert page.text_content("#log") == "" and page.evaluate("document.activeElement.id") == "input"
    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-chat'")
    assert messages(page) == []
    assert page.input_value("#system") == "Be kind."  # reset forgets the conversation, not the settings


def test_stop_frees_the_request_on_the_server(browser: Any, serve: Any) -> None:
    """Stop aborts the stream, and the server cancels the request and frees its KV blocks at once (a server whose
    every forward pass is slowed down, so the whole reply would take seconds)."""
    running = serve()
    running.slow_down(0.05)  # 100 tokens: 5 s
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(running.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
    set_controls(page, temperature="0", max_tokens="100")
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('#log [data-streaming] .content')?.textContent.length > 0")
    assert running.health()["kv_blocks_in_use"] > 0
    page.click("#stop")
    wait_idle(page, 2)
    health = running.wait_idle(timeout=2)
    assert health["running"] == 0 and health["kv_blocks_in_use"] == 0
    assert messages(page)[1]["stopped"]
    context.close()
