"""``omnilm serve`` on a tiny random Thinker: the official openai client sends images, audio and video as content
parts; every reply equals ``generate_thinker`` run here on the same inputs, decoded independently of the server."""

from __future__ import annotations

import base64
import http.client
import io
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from live_server import API_KEY, InProcess, free_port, start_process
from omnilm.infer.sampling import SamplingParams
from omnilm.omni.audio import read_wav, resample, write_wav
from omnilm.omni.thinker import Thinker, load_thinker
from omnilm.tokenizer import Tokenizer
from tiny_thinker import noise_image, reference_reply, tiny_thinker_folder, tone

PROMPT = "What is this?"
NAME = "tiny-thinker"


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    return tiny_thinker_folder(tmp_path_factory.mktemp("thinker") / NAME, tokenizer)


@pytest.fixture(scope="module")
def reference(thinker_dir: Path) -> tuple[Thinker, Tokenizer]:
    """The same folder loaded in this process: the reference the server's replies are compared with."""
    return load_thinker(thinker_dir), Tokenizer.from_dir(thinker_dir)


@pytest.fixture(scope="module")
def served(thinker_dir: Path) -> Iterator[dict]:
    """``omnilm serve`` as a real process (its engine in a process of its own, the default), behind an API key."""
    port = free_port()
    proc = start_process(thinker_dir, port, "--api-key", API_KEY)
    yield {"port": port, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


def client(port: int):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)


def png_url(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_b64(waveform: torch.Tensor, rate: int = 16_000) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sound.wav"
        write_wav(path, waveform, rate)
        return base64.b64encode(path.read_bytes()).decode()


def heard(b64: str, tmp_path: Path) -> torch.Tensor:
    """What a WAV sent as base64 holds, at 16 kHz (16-bit quantisation included), read here."""
    path = tmp_path / f"sent-{len(list(tmp_path.iterdir()))}.wav"
    path.write_bytes(base64.b64decode(b64))
    samples, rate = read_wav(path)
    return resample(samples, rate, 16_000)


def expect(reference: tuple[Thinker, Tokenizer], parts: list[dict], params: SamplingParams) -> tuple[str, int, int]:
    thinker, tokenizer = reference
    return reference_reply(thinker, tokenizer, [{"role": "user", "content": parts}], params)


def post(port: int, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body),
                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_models_lists_the_media_the_thinker_reads(served: dict) -> None:
    models = client(served["port"]).models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].model_extra["input_modalities"] == ["text", "audio", "image", "video"]
    assert models[0].model_extra["max_model_len"] == 512


def test_image_and_audio_parts_from_the_openai_client(served: dict, reference: Any, tmp_path: Path) -> None:
    api = client(served["port"])
    pixels = noise_image(60, 80)
    audio = wav_b64(tone(1.3, hz=330.0, rate=22_050), rate=22_050)  # resampled to 16 kHz by the server
    content = [{"type": "image_url", "image_url": {"url": png_url(pixels)}},
               {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
               {"type": "text", "text": PROMPT}]
    reply = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=16,
                                        temperature=0)
    parts = [{"type": "image", "image": pixels}, {"type": "audio", "audio": heard(audio, tmp_path)},
             {"type": "text", "text": PROMPT}]
    text, prompt_tokens, completion = expect(reference, parts, SamplingParams(max_new_tokens=16, temperature=0))
    assert reply.choices[0].message.content == text and completion > 0
    # The media's placeholders count in the prompt: usage says what the model read.
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens == completion
    assert prompt_tokens > 16 + 30  # image placeholders (≥ 4) and 1.3 s of audio (33)
    # A string content is the same as one text part; a different image is another reply.
    plain = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=16,
                                        temperature=0)
    assert plain.choices[0].message.content == expect(reference, [{"type": "text", "text": PROMPT}],
                                                      SamplingParams(max_new_tokens=16, temperature=0))[0]
    other = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url(noise_image(60, 80, seed=9))}}, content[1], content[2]]}],
        max_tokens=16, temperature=0)
    assert other.choices[0].message.content != text
    # Seeded sampling of n choices: each one is its seeded sample of the same media.
    several = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=10,
                                          temperature=1.0, seed=4, n=2)
    for index, choice in enumerate(several.choices):
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=4 + index)
        assert choice.message.content == expect(reference, parts, params)[0]


def test_a_video_part_with_frames_fps_and_soundtrack(served: dict, reference: Any, tmp_path: Path) -> None:
    frames = [noise_image(56, 56, seed=20 + i) for i in range(6)]
    soundtrack = wav_b64(tone(2.6, hz=200.0))
    video = {"frames": [png_url(f) for f in frames], "fps": 4, "audio": {"data": soundtrack, "format": "wav"}}
    messages = [{"role": "system", "content": "Describe."},
                {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": PROMPT}]}]
    reply = client(served["port"]).chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                                           temperature=0)
    thinker, tokenizer = reference
    expected = [{"role": "system", "content": "Describe."},
                {"role": "user", "content": [{"type": "video", "video": frames, "fps": 4,
                                              "audio": heard(soundtrack, tmp_path)}, {"type": "text", "text": PROMPT}]}]
    text, prompt_tokens, _ = reference_reply(thinker, tokenizer, expected, SamplingParams(max_new_tokens=16,
                                                                                          temperature=0))
    assert reply.choices[0].message.content == text and reply.usage.prompt_tokens == prompt_tokens
    silent = client(served["port"]).chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "video", "video": {"frames": video["frames"], "fps": 4}}, {"type": "text", "text": PROMPT}]}],
        max_tokens=16, temperature=0)
    assert silent.choices[0].message.content == expect(
        reference, [{"type": "video", "video": frames, "fps": 4}, {"type": "text", "text": PROMPT}],
        SamplingParams(max_new_tokens=16, temperature=0))[0]
    assert silent.usage.prompt_tokens < prompt_tokens  # the soundtrack's placeholders are gone


def test_streaming_and_stop_strings_with_media(served: dict, reference: Any) -> None:
    api = client(served["port"])
    pixels = noise_image(84, 56, seed=3)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(pixels)}},
                                             {"type": "text", "text": PROMPT}]}]
    chunks = list(api.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    parts = [{"type": "image", "image": pixels}, {"type": "text", "text": PROMPT}]
    expected, _, count = expect(reference, parts, SamplingParams(max_new_tokens=20, temperature=0))
    assert text == expected and chunks[-1].usage.completion_tokens == count
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    stop = expected[4:6]
    stopped = api.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == expected[: expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_bad_media_are_400s_naming_the_message_and_part(served: dict, tmp_path: Path) -> None:
    import openai

    api = client(served["port"])
    image = {"type": "image_url", "image_url": {"url": png_url(noise_image(28, 28))}}
    gif = io.BytesIO()
    Image.fromarray(noise_image(28, 28)).save(gif, format="GIF")
    too_long = wav_b64(tone(31.0, rate=8_000), rate=8_000)
    cases = [
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
         "message 1, part 0: only data: URLs are accepted"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,not base64!"}}, "not valid base64"),
        ({"type": "image_url", "image_url": {"url": "data:image/gif;base64," + base64.b64encode(
            gif.getvalue()).decode()}}, "GIF images are not accepted"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}},
         "not a readable PNG or JPEG image"),
        ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"ID3 mp3").decode(), "format": "mp3"}},
         "audio format 'mp3' is not supported"),
        ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF junk").decode(), "format": "wav"}},
         "not a readable PCM WAV file"),
        ({"type": "input_audio", "input_audio": {"data": too_long, "format": "wav"}},
         "31.0 s of audio; at most 30 s"),
        ({"type": "video", "video": {"frames": [image["image_url"]["url"]] * 65}}, "65 video frames; at most 64"),
        ({"type": "video", "video": {"frames": [image["image_url"]["url"], png_url(noise_image(56, 28))]}},
         "message 1, part 0, frame 1: 28x56 pixels, frame 0 is 28x28"),
        ({"type": "video", "video": {"frames": [image["image_url"]["url"]], "fps": 0}}, "video.fps must be"),
        ({"type": "file", "file": {"file_id": "x"}}, "unknown content part type \"file\""),
    ]
    for part, message in cases:
        messages = [{"role": "system", "content": "Hi"},
                    {"role": "user", "content": [part, {"type": "text", "text": PROMPT}]}]
        with pytest.raises(openai.BadRequestError) as err:
            api.chat.completions.create(model=NAME, messages=messages, max_tokens=4)
        assert message in err.value.message and err.value.body["param"] == "messages", (message, err.value.message)
    # The context counts the media: a long enough audio leaves no room for the reply.
    status, body = post(served["port"], {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav_b64(tone(20.0, rate=8_000), rate=8_000),
                                                "format": "wav"}}]}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    # Media placeholders typed into a raw prompt would have nothing to stand for.
    status, body = post(served["port"], {"prompt": "look <|IMAGE|>", "max_tokens": 2}, path="/v1/completions")
    assert status == 400 and "media marker tokens" in body["error"]["message"]
    reply = api.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [image]}], max_tokens=4,
                                        temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")  # still serving


def test_a_text_model_takes_text_parts_and_refuses_media_by_type(serve: Any) -> None:
    running = serve()
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
    conn.request("GET", "/v1/models")
    models = json.loads(conn.getresponse().read())
    assert models["data"][0]["input_modalities"] == ["text"]
    as_string = running.post({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
                              "temperature": 0}, path="/v1/chat/completions")
    as_parts = running.post({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                                       {"type": "text", "text": " there"}]}],
                             "max_tokens": 8, "temperature": 0}, path="/v1/chat/completions")
    assert as_parts[0] == 200 and as_parts[2]["choices"] == as_string[2]["choices"]
    assert as_parts[2]["usage"] == as_string[2]["usage"]
    for kind, part in (("image_url", {"image_url": {"url": png_url(noise_image(28, 28))}}),
                       ("input_audio", {"input_audio": {"data": wav_b64(tone(0.5)), "format": "wav"}}),
                       ("video", {"video": {"frames": []}})):
        status, _, body = running.post({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Look"}, {"type": kind} | part]}]}, path="/v1/chat/completions")
        assert status == 400, body
        assert body["error"]["message"] == (f"message 0, part 1: this model reads text only and cannot take a "
                                            f"{kind!r} part")


def test_an_engine_fault_fails_its_request_and_the_thinker_serves_on(thinker_dir: Path, reference: Any) -> None:
    """The engine in a thread, so that a hook on the served model's vision encoder can raise."""
    running = InProcess(thinker_dir, engine_process=False)
    try:
        def explode(module, args) -> None:  # noqa: ANN001
            raise RuntimeError("injected fault")

        hook = running.service.model.visual.register_forward_pre_hook(explode)
        image = {"type": "image_url", "image_url": {"url": png_url(noise_image(60, 80))}}
        with_image = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": PROMPT}]}],
                      "max_tokens": 8, "temperature": 0}
        status, _, body = running.post(with_image, path="/v1/chat/completions")
        assert status == 500 and body["error"]["type"] == "server_error"
        assert "injected fault" in body["error"]["message"]
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(with_image | {"stream": True}),
                     headers={"Content-Type": "application/json"})
        events = conn.getresponse().read().decode()
        assert '"error"' in events and "injected fault" in events and "[DONE]" not in events
        # Text alone never reaches the vision encoder: served as usual, and so is an image once the fault is gone.
        status, _, body = running.post({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
                                        "temperature": 0}, path="/v1/chat/completions")
        greedy = SamplingParams(max_new_tokens=8, temperature=0)
        assert status == 200
        assert body["choices"][0]["message"]["content"] == expect(reference, [{"type": "text", "text": PROMPT}],
                                                                  greedy)[0]
        hook.remove()
        status, _, body = running.post(with_image, path="/v1/chat/completions")
        parts = [{"type": "image", "image": noise_image(60, 80)}, {"type": "text", "text": PROMPT}]
        assert status == 200 and body["choices"][0]["message"]["content"] == expect(reference, parts, greedy)[0]
        assert running.health() == {"status": "ok", "running": 0, "waiting": 0}
    finally:
        running.stop()


def test_a_client_that_leaves_cancels_its_request(thinker_dir: Path) -> None:
    running = InProcess(thinker_dir, engine_process=False)
    try:
        running.service.model.decoder.tok_emb.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
        running.service.engine.eos_ids = set()  # a random model may say end-of-text at once: this one may not
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_url(noise_image(60, 80))}}]}], "max_tokens": 100,
            "temperature": 0, "stream": True}
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        while b'"content"' not in (line := response.readline()):  # the first generated token
            assert line.startswith(b"data: ") or line == b"\n"
        assert running.health()["running"] == 1
        conn.close()  # 100 tokens would take 5 s: the request must end well before
        health = running.wait_idle(timeout=2)
        assert health["running"] == 0 and health["waiting"] == 0
    finally:
        running.stop()
