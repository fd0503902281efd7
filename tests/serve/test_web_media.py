"""The web chat page with media, driven in headless Chromium (Debian's ``chromium``) through Playwright: attached
images and audio files, and a recording from a fake microphone fed from a WAV file, reach a Thinker served by
``omnilm serve`` as OpenAI content parts, and the streamed replies are ``generate_thinker``'s on what was sent.

Skipped where Chromium or Playwright is missing. Screenshots go under the test's ``tmp_path``, and into the folder
named by ``OMNILM_ARTIFACTS`` when it is set.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from chromium import TIMEOUT_MS, chromium
from live_server import API_KEY, free_port, start_process
from omnilm.infer.sampling import SamplingParams
from omnilm.omni.audio import read_wav, write_wav
from omnilm.omni.thinker import load_thinker
from omnilm.tokenizer import Tokenizer
from tiny_thinker import noise_image, reference_reply, tiny_thinker_folder, tone

MIC_HZ = 440.0
NAME = "tiny-thinker"
PROMPT = "What is this?"


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Iterator[dict]:
    """``omnilm serve`` on a tiny Thinker (context 1024, bodies up to 4 MB for long audio), and the same model loaded
    here for the reference replies."""
    folder = tiny_thinker_folder(tmp_path_factory.mktemp("web-media") / NAME, tokenizer, max_seq_len=1024)
    port = free_port()
    proc = start_process(folder, port, "--max-body-bytes", "4000000")
    yield {"port": port, "model": load_thinker(folder), "tokenizer": Tokenizer.from_dir(folder)}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    microphone = tmp_path_factory.mktemp("microphone") / "tone.wav"
    write_wav(microphone, tone(4.0, hz=MIC_HZ, rate=48_000), 48_000)  # played in a loop while recording
    # The microphone is a fake device playing that file, and its permission prompt is answered yes.
    with chromium(["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                   f"--use-file-for-fake-audio-capture={microphone}"]) as browser:
        yield browser


@pytest.fixture
def page(browser: Any, thinker: dict) -> Iterator[Any]:
    """A fresh browser context (empty localStorage, microphone allowed) on the page; fails on any script error."""
    context = browser.new_context(viewport={"width": 1120, "height": 760})
    context.grant_permissions(["microphone"])
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"http://127.0.0.1:{thinker['port']}/")
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{NAME}'")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "16")
    yield page
    context.close()
    assert not errors, errors


def shown(page: Any) -> list[dict[str, Any]]:
    """The log: per message its role, text, stats and the media it shows."""
    return page.eval_on_selector_all("#log .msg", """boxes => boxes.map(b => ({
        role: b.classList.contains('user') ? 'user' : 'assistant', content: b.querySelector('.content').textContent,
        stats: b.querySelector('.stats')?.textContent ?? null, error: b.classList.contains('error'),
        images: [...b.querySelectorAll('.media img')].map(i => i.src),
        sounds: [...b.querySelectorAll('.media audio')].map(a => a.src),
        omitted: [...b.querySelectorAll('.media .omitted')].map(c => c.textContent)}))""")


def send(page: Any, text: str) -> dict[str, Any]:
    """Type ``text`` (possibly nothing), send, wait for the whole reply; the request body the page sent."""
    before = len(shown(page))
    page.fill("#input", text)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.click("#send")
    page.wait_for_function("n => document.querySelectorAll('#log .msg').length === n"
                           " && !document.querySelector('#log [data-streaming]')", arg=before + 2)
    return request.value.post_data_json


def attach(page: Any, path: Path, kind: str) -> None:
    count = page.locator(f"#attachments .chip.{kind}").count()
    page.set_input_files("#file", str(path))
    page.wait_for_function(f"document.querySelectorAll('#attachments .chip.{kind}').length === {count + 1}")


def decoded_wav(part: dict[str, Any], tmp_path: Path) -> torch.Tensor:
    """The samples of an input_audio part, which must be 16 kHz mono 16-bit WAV."""
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    data = base64.b64decode(part["input_audio"]["data"])
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    channels, rate, bits = int.from_bytes(data[22:24], "little"), int.from_bytes(data[24:28], "little"), \
        int.from_bytes(data[34:36], "little")
    assert (channels, rate, bits) == (1, 16_000, 16)
    path = tmp_path / f"sent-{time.monotonic_ns()}.wav"
    path.write_bytes(data)
    samples, _ = read_wav(path)
    return samples


def peak_hz(samples: torch.Tensor, rate: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(samples.numpy() * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def reference(thinker: dict, parts: list[dict], max_tokens: int = 16) -> tuple[str, int]:
    """What ``generate_thinker`` replies here (greedy) to one user turn of processor parts; and its token count."""
    text, _, count = reference_reply(thinker["model"], thinker["tokenizer"], [{"role": "user", "content": parts}],
                                     SamplingParams(max_new_tokens=max_tokens, temperature=0))
    return text, count


def tokens_of(stats: str) -> int:
    return int(stats.rsplit(" · ", 1)[-1].split()[0])


def save_screenshot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("OMNILM_ARTIFACTS"):
        folder = Path(os.environ["OMNILM_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)


def test_media_controls_show_only_for_a_model_that_reads_media(browser: Any, served: dict, page: Any) -> None:
    assert page.is_visible("#attach") and page.is_visible("#record")
    accept = page.get_attribute("#file", "accept")
    assert "image/*" in accept and "audio/*" in accept
    context = browser.new_context()
    text_page = context.new_page()
    text_page.goto(f"http://127.0.0.1:{served['port']}/")  # the text model of the other tests (key required)
    text_page.fill("#api_key", API_KEY)
    text_page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-chat'")
    assert text_page.is_hidden("#attach") and text_page.is_hidden("#record") and text_page.is_hidden("#attachments")
    context.close()


def test_an_attached_image_is_sent_as_a_data_url_and_kept_with_the_conversation(page: Any, thinker: dict,
                                                                                tmp_path: Path) -> None:
    pixels = noise_image(60, 80)
    png = tmp_path / "noise.png"
    Image.fromarray(pixels).save(png)
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    attach(page, png, "image")
    assert page.get_attribute("#attachments .chip.image img", "src") == url  # the thumbnail is the very file
    page.click("#attachments .chip.image .remove")  # removed, and attached again
    assert page.is_hidden("#attachments") and page.locator("#attachments .chip").count() == 0
    attach(page, png, "image")
    body = send(page, PROMPT)
    assert body["messages"] == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": PROMPT}]}]
    assert body["stream"] is True and page.is_hidden("#attachments")
    user, reply = shown(page)
    assert user["images"] == [url] and user["content"] == PROMPT
    # The streamed reply is the Thinker's greedy reply to this image, computed here.
    expected, count = reference(thinker, [{"type": "image", "image": pixels}, {"type": "text", "text": PROMPT}])
    assert reply["content"] == expected and tokens_of(reply["stats"]) == count and reply["stats"].startswith("TTFT")
    save_screenshot(page, tmp_path, "web_media_image.png")
    # A reload keeps the image with the conversation, and the next turn sends it again.
    page.reload()
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{NAME}'")
    assert shown(page)[0]["images"] == [url]
    body = send(page, "And now?")
    assert body["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": url}}
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    # An image bigger than the model uses is redrawn within its pixel budget, as JPEG.
    big = tmp_path / "big.png"
    Image.fromarray(noise_image(1500, 2000, seed=2)).save(big)
    attach(page, big, "image")
    src = page.get_attribute("#attachments .chip.image img", "src")
    assert src.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as redrawn:
        width, height = redrawn.size
    assert width * height <= 1280 * 28 * 28 and abs(width / height - 4 / 3) < 0.01 and width > 1000


def test_an_attached_audio_file_is_sent_as_16_khz_wav(page: Any, thinker: dict, tmp_path: Path) -> None:
    sound = tmp_path / "chord.wav"
    stereo = torch.stack([tone(1.25, hz=523.0, rate=22_050), tone(1.25, hz=523.0, rate=22_050) * 0.5])
    write_wav(sound, stereo, 22_050)  # 22.05 kHz stereo: the page mixes and resamples
    attach(page, sound, "audio")
    assert page.text_content("#attachments .chip.audio .label") == "chord.wav"
    body = send(page, PROMPT)
    part, text = body["messages"][0]["content"]
    assert text == {"type": "text", "text": PROMPT}
    samples = decoded_wav(part, tmp_path)
    assert abs(len(samples) - 20_000) <= 2  # 1.25 s at 16 kHz
    assert abs(peak_hz(samples) - 523.0) < 3
    rms = float(samples[1000:-1000].square().mean().sqrt())
    assert abs(rms - 0.75 * 0.5 / 2**0.5) < 0.02  # the mean of both channels
    expected, count = reference(thinker, [{"type": "audio", "audio": samples}, {"type": "text", "text": PROMPT}])
    reply = shown(page)[1]
    assert reply["content"] == expected and tokens_of(reply["stats"]) == count


def test_a_recording_from_the_microphone_is_sent_as_wav(page: Any, thinker: dict, tmp_path: Path) -> None:
    page.click("#record")
    page.wait_for_function("document.getElementById('record').getAttribute('aria-pressed') === 'true'")
    began = time.monotonic()
    time.sleep(1.5)
    page.wait_for_function("document.getElementById('record-label').textContent.startsWith('Stop 0:01')")
    save_screenshot(page, tmp_path, "web_media_recording.png")
    page.click("#record")
    elapsed = time.monotonic() - began
    page.wait_for_selector("#attachments .chip.audio")
    label = page.text_content("#attachments .chip.audio .label")
    assert label.startswith("Recording 0:01.") and page.get_attribute("#record", "aria-pressed") == "false"
    body = send(page, "")  # a message of audio alone
    (part,) = body["messages"][0]["content"]
    samples = decoded_wav(part, tmp_path)
    seconds = len(samples) / 16_000
    assert elapsed - 0.5 < seconds < elapsed + 0.3, (seconds, elapsed)
    assert abs(peak_hz(samples) - MIC_HZ) < 5  # the fake microphone's tone
    assert float(samples.square().mean().sqrt()) > 0.1
    assert label == f"Recording 0:{int(seconds):02d}.{int(seconds * 10) % 10}"
    user, reply = shown(page)
    assert user["content"] == "" and len(user["sounds"]) == 1
    expected, count = reference(thinker, [{"type": "audio", "audio": samples}])
    assert reply["content"] == expected and tokens_of(reply["stats"]) == count
    save_screenshot(page, tmp_path, "web_media_recorded.png")


def test_media_too_big_to_store_come_back_as_placeholders(page: Any, tmp_path: Path) -> None:
    long = tmp_path / "long.wav"
    write_wav(long, tone(24.0, hz=300.0), 16_000)  # 768 KB of WAV: over a million characters of base64
    attach(page, long, "audio")
    first = send(page, "Listen.")
    assert first["messages"][0]["content"][0]["type"] == "input_audio"
    assert not shown(page)[1]["error"]
    page.reload()
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{NAME}'")
    assert shown(page)[0]["omitted"] == ["audio not kept (too large to store in this browser)"]
    body = send(page, "Again?")
    assert body["messages"][0]["content"] == [{"type": "text", "text": "[audio not kept]"},
                                              {"type": "text", "text": "Listen."}]
