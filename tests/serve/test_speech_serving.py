"""``omnilm serve`` on a tiny random Thinker with a voice: ``/v1/audio/speech`` and chat completions with
``modalities: ["text", "audio"]`` through the official openai client, and the web chat playing spoken replies in
headless Chromium. Every sound is compared, sample for sample (as 16-bit PCM), with ``Voice.speak`` /
``Voice.speak_text`` run here on the same folder, prompt and reply.

The voice is random but made to end its speech: its decoder layers are faint, its projection is the identity and
its codec head's end row points along the Thinker's embedding of the text-pad token, which the Talker reads once
the reply track has run out; so it speaks about one code per reply token, then stops.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from chromium import TIMEOUT_MS, chromium
from live_server import InProcess, free_port, start_process
from omnilm.infer.detokenize import StreamingDecoder
from omnilm.infer.generate import FINISHED
from omnilm.infer.sampling import SamplingParams
from omnilm.model.config import ModelConfig
from omnilm.omni.dit import DiT, DiTConfig
from omnilm.omni.generate import generate_thinker
from omnilm.omni.processor import OmniProcessor
from omnilm.omni.speech import Token2Wav, Voice, load_voice, save_voice
from omnilm.omni.talker import Talker, TalkerConfig
from omnilm.omni.thinker import Thinker, load_thinker
from omnilm.omni.vocoder import GriffinLimVocoder
from omnilm.tokenizer import Tokenizer
from omnilm.tokenizer.chat import IM_END, IM_START
from tiny_thinker import noise_image, tiny_thinker_folder

NAME = "tiny-voice"
VOICE = "default"  # a voice that does not name itself
RATE = 16_000  # Griffin–Lim speaks at 16 kHz
CODES = 16  # codec ids; the Talker's vocabulary adds pad, start, end and mask
PROMPT = "What is this?"


def tiny_voice(folder: Path) -> Path:
    """Give the thinker folder ``folder`` a tiny random voice (Talker, DiT, Griffin–Lim); see the module docstring."""
    thinker, tokenizer = load_thinker(folder), Tokenizer.from_dir(folder)
    c = thinker.config
    width = c.text.d_model
    text_pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    media_ids = {name: getattr(c, name) for name in ("audio_token_id", "image_token_id", "video_token_id",
                                                     "audio_start_token_id", "audio_end_token_id",
                                                     "vision_start_token_id", "vision_end_token_id")}
    config = TalkerConfig(
        text=ModelConfig(family="qwen2", vocab_size=CODES + 4, n_layer=1, n_head=4, n_kv_head=2, d_model=width,
                         max_seq_len=1024, mrope_section=(2, 3, 3), qkv_bias=True, tie_embeddings=False),
        embedding_size=width, tts_codec_pad_token_id=CODES, tts_codec_start_token_id=CODES + 1,
        tts_codec_end_token_id=CODES + 2, tts_codec_mask_token_id=CODES + 3,
        tts_text_start_token_id=tokenizer.token_to_id(IM_START), tts_text_end_token_id=tokenizer.token_to_id(IM_END),
        tts_text_pad_token_id=text_pad, position_id_per_seconds=c.position_id_per_seconds,
        seconds_per_chunk=c.seconds_per_chunk, spatial_merge_size=c.vision.spatial_merge_size, **media_ids)
    talker = Talker(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in talker.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            if name.endswith("weight") and param.dim() == 1:  # norm scales
                param.fill_(1.0)
        talker.thinker_to_talker_proj.weight.copy_(torch.eye(width))
        talker.codec_embedding.weight.mul_(2.0)
        pad = thinker.decoder.tok_emb.weight[text_pad]
        head = talker.codec_head.weight  # (codes + 4, width)
        head.copy_(torch.randn(head.shape, generator=generator) * 0.3)
        head[config.tts_codec_end_token_id] = pad / pad.norm()  # ends speech where the reply track is padding
        head[config.tts_codec_pad_token_id] = 0.0
        head[config.tts_codec_mask_token_id] = -pad / pad.norm()
    dit = DiT(DiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
                        block_size=4, look_ahead_layers=(1,), look_backward_layers=(0,), num_embeds=CODES + 4,
                        mel_dim=128, dropout=0.0, enc_emb_dim=16, enc_dim=16, enc_channels=(16, 16, 16, 16, 48),
                        enc_attention_channels=8, enc_se_channels=8)).eval()
    token2wav = Token2Wav(dit, GriffinLimVocoder(iterations=4), torch.randn(1, 8, 128, generator=generator) * 0.1,
                          torch.randn(1, 16, generator=generator), steps=2, method="euler", context_frames=(8, 8))
    return save_voice(folder, talker, token2wav, tokenizer.token_to_id(IM_START))


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A tiny Thinker without a voice."""
    return tiny_thinker_folder(tmp_path_factory.mktemp("mute") / "tiny-mute", tokenizer)


@pytest.fixture(scope="module")
def voice_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The same tiny Thinker, with a voice."""
    return tiny_voice(tiny_thinker_folder(tmp_path_factory.mktemp("voice") / NAME, tokenizer))


@pytest.fixture(scope="module")
def voice(voice_dir: Path) -> Voice:
    """The folder's voice loaded in this process: the reference the server's sounds are compared with."""
    loaded = load_voice(voice_dir)
    assert loaded is not None and loaded.sample_rate == RATE
    return loaded


@pytest.fixture(scope="module")
def speaking(voice_dir: Path) -> Iterator[int]:
    """``omnilm serve`` on the folder with a voice, as a real process (its engine in a process of its own); its port."""
    port = free_port()
    proc = start_process(voice_dir, port)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def client(port: int):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


def post(port: int, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def quantised(chunks: list[np.ndarray]) -> np.ndarray:
    """The 16-bit samples of float chunks, as ``write_wav`` writes them."""
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return np.clip(np.round(samples.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def wav_samples(data: bytes) -> np.ndarray:
    """The samples of a whole WAV file, read by Python's wave module (which checks the header's sizes)."""
    with wave.open(io.BytesIO(data), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, RATE)
        frames = f.readframes(f.getnframes())
        assert f.getnframes() * 2 == len(data) - 44
    return pcm(frames)


def spoken_reply(voice: Voice, messages: list[dict[str, Any]], max_tokens: int) -> tuple[str, np.ndarray]:
    """What the server should answer, computed here: the greedy reply (as a chat reply ends: at the end of the
    turn) and ``Voice.speak`` of it on the same prompt, as 16-bit samples."""
    thinker: Thinker = voice.thinker
    processor = OmniProcessor(voice.tokenizer, thinker.config, thinker.media_budget)
    batch = processor.collate([processor.encode(messages, add_generation_prompt=True)], pad_id=0, left_pad=True)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0)
    decoder, reply, text = StreamingDecoder(voice.tokenizer, ()), [], ""
    for step in generate_thinker(thinker, batch, params, voice.eos_ids, 0):
        token = int(step[0])
        if token == FINISHED or token in voice.eos_ids:
            break
        reply.append(token)
        text += decoder.push(token)
    return text + decoder.finish(), quantised(list(voice.speak(batch, reply)))


def png_url(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_models_say_the_model_speaks(speaking: int) -> None:
    (model,) = client(speaking).models.list().data
    assert model.id == NAME and model.model_extra["output_modalities"] == ["text", "audio"]
    assert model.model_extra["voices"] == [VOICE] and model.model_extra["audio_sample_rate"] == RATE


def test_text_to_speech_as_wav_pcm_and_streams(speaking: int, voice: Voice) -> None:
    text = "Hello there, how are you?"
    expected = quantised(list(voice.speak_text(text)))
    assert len(expected) > 4 * 640  # several DiT blocks of 4 frames (640 samples)
    api = client(speaking)
    whole = api.audio.speech.create(model=NAME, input=text, voice=VOICE, response_format="wav")
    assert whole.response.headers["content-type"] == "audio/wav"
    assert np.array_equal(wav_samples(whole.content), expected)
    # Raw PCM, streamed as it is made; the rate is in a header.
    with api.audio.speech.with_streaming_response.create(model=NAME, input=text, voice=VOICE,
                                                         response_format="pcm") as response:
        assert response.headers["content-type"] == "audio/pcm" and response.headers["x-sample-rate"] == str(RATE)
        assert response.headers.get("transfer-encoding") == "chunked"
        data = b"".join(response.iter_bytes())
    assert np.array_equal(pcm(data), expected)
    # A streamed WAV: the header before the length is known, then the samples.
    status, headers, data = post(speaking, "/v1/audio/speech", {"input": text, "voice": VOICE,
                                                                "stream_format": "audio"})
    assert status == 200 and headers["content-type"] == "audio/wav" and headers["transfer-encoding"] == "chunked"
    assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff" and data[40:44] == b"\xff\xff\xff\xff"
    assert np.array_equal(pcm(data[44:]), expected)
    # Server-sent events: base64 deltas, then done with the usage.
    status, headers, data = post(speaking, "/v1/audio/speech", {"input": text, "voice": VOICE,
                                                                "response_format": "pcm", "stream_format": "sse"})
    events = [json.loads(line[6:]) for line in data.decode().split("\n\n") if line.startswith("data: ")]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"} and events[-1]["type"] == "speech.audio.done"
    assert len(events) > 2 and events[-1]["usage"]["input_tokens"] == len(voice.tokenizer.encode(text))
    assert np.array_equal(pcm(b"".join(base64.b64decode(e["audio"]) for e in events[:-1])), expected)


def test_bad_speech_requests_are_400s_and_the_server_serves_on(speaking: int, voice: Voice) -> None:
    import openai

    api = client(speaking)
    cases = [({"response_format": "mp3"}, 'response_format "mp3" is not supported (supported: wav, pcm)'),
             ({"voice": "alloy"}, f"unknown voice \"alloy\"; this model speaks with one voice: '{VOICE}'"),
             ({"speed": 1.5}, "speed is not supported"),
             ({"instructions": "Whisper."}, "instructions are not supported"),
             ({"input": " "}, "input must be a non-empty string"),
             ({"input": "x" * 4097}, "input has 4097 characters; at most 4096")]
    for change, message in cases:
        with pytest.raises(openai.BadRequestError) as err:
            api.audio.speech.create(**({"model": NAME, "input": "Hi", "voice": VOICE} | change))
        assert message in err.value.message, (message, err.value.message)
    status, _, body = post(speaking, "/v1/audio/speech", {"input": "Hi", "stream_format": "websocket"})
    assert status == 400 and "stream_format" in json.loads(body)["error"]["message"]
    # The voice is optional (there is one), also as {"id": ...}; the server still speaks.
    expected = quantised(list(voice.speak_text("Hi")))
    status, _, data = post(speaking, "/v1/audio/speech", {"input": "Hi", "voice": {"id": VOICE}})
    assert status == 200 and np.array_equal(wav_samples(data), expected)
    status, _, data = post(speaking, "/v1/audio/speech", {"input": "Hi"})
    assert status == 200 and np.array_equal(wav_samples(data), expected)


def test_chat_replies_spoken_through_the_openai_client(speaking: int, voice: Voice) -> None:
    import openai

    api = client(speaking)
    pixels = noise_image(56, 84, seed=5)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(pixels)}},
                                             {"type": "text", "text": PROMPT}]}]
    text, expected = spoken_reply(voice, [{"role": "user", "content": [{"type": "image", "image": pixels},
                                                                       {"type": "text", "text": PROMPT}]}], 12)
    assert text and len(expected) > 0
    reply = api.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                        modalities=["text", "audio"], audio={"voice": VOICE, "format": "wav"})
    message = reply.choices[0].message
    assert message.content is None and message.audio.transcript == text  # the text is the audio's transcript
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > time.time() + 3000
    whole = base64.b64decode(message.audio.data)
    assert np.array_equal(wav_samples(whole), expected)
    # Streamed: the transcript pieces while the Thinker writes, then the sound while the Talker speaks.
    chunks = list(api.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                              modalities=["text", "audio"], audio={"voice": VOICE, "format": "pcm16"},
                                              stream=True, stream_options={"include_usage": True}))
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    kinds = ["transcript" if a.transcript else "data" if a.data else "end" for a in audio]
    assert kinds == sorted(kinds, key=["transcript", "data", "end"].index) and kinds[-1] == "end"
    assert kinds.count("transcript") > 1 and kinds.count("data") > 1  # both really streamed
    assert len({a.id for a in audio}) == 1 and audio[-1].expires_at is not None
    assert "".join(a.transcript for a in audio if a.transcript) == text
    streamed = b"".join(base64.b64decode(a.data) for a in audio if a.data)
    assert streamed == whole[44:]  # the same pcm16 as the whole reply's WAV
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [reply.choices[0].finish_reason] and chunks[-1].usage.completion_tokens > 0
    # pcm16 as a whole reply; text only when audio is not asked for.
    raw = api.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                      modalities=["text", "audio"], audio={"voice": VOICE, "format": "pcm16"})
    assert base64.b64decode(raw.choices[0].message.audio.data) == whole[44:]
    plain = api.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == text and plain.choices[0].message.audio is None
    # A later turn may send the spoken reply back by its audio id: it stands for its transcript.
    follow = [*messages, {"role": "assistant", "audio": {"id": message.audio.id}}, {"role": "user", "content": "And?"}]
    written = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "And?"}]
    by_id = api.chat.completions.create(model=NAME, messages=follow, max_tokens=6, temperature=0)
    by_text = api.chat.completions.create(model=NAME, messages=written, max_tokens=6, temperature=0)
    assert by_id.choices[0].message.content == by_text.choices[0].message.content
    assert by_id.usage.prompt_tokens == by_text.usage.prompt_tokens
    cases = [({"audio": {"voice": "alloy", "format": "wav"}}, 'unknown voice "alloy"'),
             ({"audio": {"voice": VOICE, "format": "mp3"}}, 'audio.format "mp3" is not supported (supported: wav, '
                                                            "pcm16)"),
             ({"audio": {"voice": VOICE, "format": "wav"}, "stream": True}, "audio.format 'wav' cannot be streamed"),
             ({"modalities": ["text", "video"]}, "unknown output modality 'video'"),
             ({"modalities": ["text"], "audio": {"voice": VOICE}}, "modalities does not include \"audio\"")]
    for change, expected_message in cases:
        body = {"model": NAME, "messages": messages, "max_tokens": 4, "modalities": ["text", "audio"]} | change
        with pytest.raises(openai.BadRequestError) as err:
            api.chat.completions.create(**body)
        assert expected_message in err.value.message, (expected_message, err.value.message)
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=NAME, max_tokens=4, messages=[
            *messages, {"role": "assistant", "audio": {"id": "audio_unknown"}}, {"role": "user", "content": "And?"}])
    assert 'message 1: the audio "audio_unknown" is unknown here or has expired' in err.value.message


def test_a_thinker_without_a_voice_refuses_audio(thinker_dir: Path) -> None:
    import openai

    running = InProcess(thinker_dir, engine_process=False)
    try:
        api = client(running.port)
        (model,) = api.models.list().data
        assert model.model_extra["output_modalities"] == ["text"] and "voices" not in model.model_extra
        with pytest.raises(openai.BadRequestError) as err:
            api.chat.completions.create(model="tiny-mute", messages=[{"role": "user", "content": PROMPT}],
                                        max_tokens=4, modalities=["text", "audio"], audio={"voice": VOICE,
                                                                                          "format": "wav"})
        assert "the model 'tiny-mute' has no voice: it answers in text only" in err.value.message
        assert err.value.code == "audio_not_supported"
        with pytest.raises(openai.BadRequestError) as err:
            api.audio.speech.create(model="tiny-mute", input="Hello", voice=VOICE)
        assert "has no voice" in err.value.message
        reply = api.chat.completions.create(model="tiny-mute", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=4, modalities=["text"])
        assert reply.choices[0].message.audio is None and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        running.stop()


def test_a_fault_in_speech_fails_its_request_and_the_voice_speaks_on(voice_dir: Path, voice: Voice) -> None:
    """The engine in a thread, so that a hook on the served Talker can raise."""
    running = InProcess(voice_dir, engine_process=False)
    try:
        def explode(module, args) -> None:  # noqa: ANN001
            raise RuntimeError("injected talker fault")

        hook = running.service.engine.voice.talker.register_forward_pre_hook(explode)
        for body in ({"input": "Hello"}, {"input": "Hello", "response_format": "pcm"}):
            status, _, data = post(running.port, "/v1/audio/speech", body)
            assert status == 500 and "injected talker fault" in json.loads(data)["error"]["message"]
        chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0,
                "modalities": ["text", "audio"]}
        status, _, data = post(running.port, "/v1/chat/completions", chat)
        assert status == 500 and "injected talker fault" in json.loads(data)["error"]["message"]
        status, _, data = post(running.port, "/v1/chat/completions", chat | {"stream": True})
        events = data.decode()
        assert status == 200 and '"transcript"' in events and "injected talker fault" in events
        assert "[DONE]" not in events
        hook.remove()
        status, _, data = post(running.port, "/v1/audio/speech", {"input": "Hello"})
        assert status == 200 and np.array_equal(wav_samples(data), quantised(list(voice.speak_text("Hello"))))
        assert running.health() == {"status": "ok", "running": 0, "waiting": 0}
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------------- web chat


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(["--autoplay-policy=no-user-gesture-required"]) as browser:
        yield browser


def test_the_web_chat_plays_spoken_replies_as_they_stream(browser: Any, speaking: int, voice: Voice) -> None:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"http://127.0.0.1:{speaking}/")
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{NAME}'")
    assert page.is_visible("#speak-field") and not page.is_checked("#speak")
    page.check("#speak")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "10")
    page.fill("#input", PROMPT)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.click("#send")
    page.wait_for_function("document.querySelectorAll('#log .msg').length === 2"
                           " && !document.querySelector('#log [data-streaming]')")
    body = request.value.post_data_json
    assert body["modalities"] == ["text", "audio"] and body["audio"] == {"voice": VOICE, "format": "pcm16"}
    text, expected = spoken_reply(voice, [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}], 10)
    reply = page.locator("#log .msg.assistant")
    assert reply.locator(".content").text_content() == text  # the transcript, shown as it streamed
    # Every chunk was scheduled on the page's AudioContext as it arrived: together, the whole reply.
    chunks = int(reply.get_attribute("data-audio-chunks"))
    assert chunks >= 1 and int(reply.get_attribute("data-audio-samples")) == len(expected)
    assert page.evaluate("audioContext instanceof AudioContext && audioContext.state !== 'closed'")
    # The sound is kept with the reply (a WAV data: URL), and its Play button plays it again.
    stored = page.evaluate("JSON.parse(localStorage.getItem('omnilm.chat.turns'))[1].speech")
    assert stored["seconds"] == pytest.approx(len(expected) / RATE)
    assert np.array_equal(wav_samples(base64.b64decode(stored["url"].split(",", 1)[1])), expected)
    page.click("#log .msg.assistant .speech .play")
    page.wait_for_function("document.querySelector('#log .msg.assistant').dataset.replays === '1'")
    assert int(reply.get_attribute("data-audio-chunks")) == chunks + 1
    assert int(reply.get_attribute("data-audio-samples")) == 2 * len(expected)
    # A reload keeps the reply's sound; with speaking off, the request asks for text only.
    page.reload()
    page.wait_for_function(f"document.getElementById('model-name').textContent === '{NAME}'")
    assert page.is_checked("#speak") and page.is_visible("#log .msg.assistant .speech .play")
    page.uncheck("#speak")
    page.fill("#input", "And?")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.click("#send")
    page.wait_for_function("document.querySelectorAll('#log .msg').length === 4"
                           " && !document.querySelector('#log [data-streaming]')")
    assert "modalities" not in request.value.post_data_json
    assert request.value.post_data_json["messages"][1] == {"role": "assistant", "content": text}
    context.close()
    assert not errors, errors
