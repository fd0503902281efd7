"""``omnilm omni ask`` on a tiny random Thinker: the printed reply is ``generate_thinker``'s for the same inputs,
decoded and encoded here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import small_model
from omnilm.cli import main
from omnilm.infer.sampling import SamplingParams
from omnilm.model.hf import save_pretrained
from omnilm.omni.audio import read_wav, resample
from omnilm.omni.thinker import load_thinker
from omnilm.tokenizer import Tokenizer
from tiny_thinker import noise_image, reference_reply, tiny_thinker_folder, tone_wav

PROMPT = "What is this?"


@pytest.fixture(scope="module")
def thinker_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    return tiny_thinker_folder(tmp_path_factory.mktemp("omni-cli") / "tiny-thinker", tokenizer)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    Image.fromarray(noise_image(60, 80)).save(folder / "noise.png")
    Image.fromarray(noise_image(90, 50, seed=1)).save(folder / "other.png")
    tone_wav(folder / "tone.wav", 1.3, hz=440.0, rate=22_050)  # not 16 kHz: the reply needs the resampling
    tone_wav(folder / "hum.wav", 2.5, hz=150.0)
    frames = folder / "frames"
    frames.mkdir()
    # Few colours, so that the GIF of the same frames is exact (GIF keeps at most 256 colours per frame).
    blocks = [np.kron(np.random.default_rng(i).integers(0, 4, (4, 4, 1)) * 80, np.ones((14, 14, 3))).astype(np.uint8)
              for i in range(5)]
    for i, frame in enumerate(blocks):
        Image.fromarray(frame).save(frames / f"{i:03d}.png")
    (frames / "video.json").write_text(json.dumps({"fps": 2.0}))
    pictures = [Image.fromarray(frame) for frame in blocks]
    pictures[0].save(folder / "clip.gif", save_all=True, append_images=pictures[1:], duration=500, loop=0)
    return {"image": folder / "noise.png", "other": folder / "other.png", "audio": folder / "tone.wav",
            "hum": folder / "hum.wav", "frames": frames, "gif": folder / "clip.gif"}


def run_ask(capsys: pytest.CaptureFixture, *args: str) -> str:
    capsys.readouterr()
    assert main(["omni", "ask", *args]) == 0
    return capsys.readouterr().out


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def waveform(path: Path):  # noqa: ANN201
    samples, rate = read_wav(path)
    return resample(samples, rate, 16_000)


def expected(folder: Path, parts: list[dict], params: SamplingParams, system: str | None = None) -> str:
    thinker, tokenizer = load_thinker(folder), Tokenizer.from_dir(folder)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": [*parts, {"type": "text", "text": PROMPT}]}]
    text, _, count = reference_reply(thinker, tokenizer, messages, params)
    assert count > 0
    return text + "\n"


def test_ask_with_an_image_and_an_audio_prints_the_greedy_reply(thinker_dir: Path, media: dict, capsys) -> None:  # noqa: ANN001
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    image = {"type": "image", "image": pixels(media["image"])}
    audio = {"type": "audio", "audio": waveform(media["audio"])}
    out = run_ask(capsys, "--model", str(thinker_dir), "--image", str(media["image"]), "--audio", str(media["audio"]),
                  "--prompt", PROMPT, "--max-new-tokens", "16")
    assert out == expected(thinker_dir, [image, audio], greedy)
    # The media are in the order given on the command line, and each one counts.
    swapped = run_ask(capsys, "--model", str(thinker_dir), "--audio", str(media["audio"]), "--image",
                      str(media["image"]), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert swapped == expected(thinker_dir, [audio, image], greedy)
    other = {"type": "image", "image": pixels(media["other"])}
    several = run_ask(capsys, "--model", str(thinker_dir), "--image", str(media["image"]), "--image",
                      str(media["other"]), "--audio", str(media["audio"]), "--audio", str(media["hum"]),
                      "--prompt", PROMPT, "--max-new-tokens", "16", "--system", "Be brief.")
    hum = {"type": "audio", "audio": waveform(media["hum"])}
    assert several == expected(thinker_dir, [image, other, audio, hum], greedy, system="Be brief.")
    assert len({out, swapped, several}) == 3


def test_ask_samples_with_a_temperature_and_seed(thinker_dir: Path, media: dict, capsys) -> None:  # noqa: ANN001
    out = run_ask(capsys, "--model", str(thinker_dir), "--image", str(media["image"]), "--prompt", PROMPT,
                  "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "5")
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    assert out == expected(thinker_dir, [{"type": "image", "image": pixels(media["image"])}], params)
    assert out != expected(thinker_dir, [{"type": "image", "image": pixels(media["image"])}],
                           SamplingParams(max_new_tokens=12, temperature=0))


def test_ask_about_a_video_with_its_soundtrack(thinker_dir: Path, media: dict, capsys) -> None:  # noqa: ANN001
    frames = [pixels(path) for path in sorted(media["frames"].glob("*.png"))]
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    video = {"type": "video", "video": frames, "fps": 2.0, "audio": waveform(media["hum"])}
    out = run_ask(capsys, "--model", str(thinker_dir), "--video", str(media["frames"]), "--video-audio",
                  str(media["hum"]), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert out == expected(thinker_dir, [video], greedy)
    # The same frames as an animated GIF (500 ms a frame: 2 fps) give the same reply.
    gif = run_ask(capsys, "--model", str(thinker_dir), "--video", str(media["gif"]), "--video-audio",
                  str(media["hum"]), "--prompt", PROMPT, "--max-new-tokens", "16")
    assert gif == out
    silent = run_ask(capsys, "--model", str(thinker_dir), "--video", str(media["frames"]), "--prompt", PROMPT,
                     "--max-new-tokens", "16")
    assert silent == expected(thinker_dir, [{"type": "video", "video": frames, "fps": 2.0}], greedy)
    assert silent != out


def test_ask_refuses_what_it_cannot_use(thinker_dir: Path, media: dict, tmp_path: Path, tokenizer: Tokenizer,
                                        capsys) -> None:  # noqa: ANN001
    text_model = save_pretrained(small_model("llama", vocab_size=tokenizer.vocab_size), tmp_path / "text",
                                 tokenizer=tokenizer)
    cases = [(["--model", str(text_model), "--image", str(media["image"])], "is not a Qwen2.5-Omni thinker"),
             (["--model", str(thinker_dir), "--image", str(tmp_path / "missing.png")], "no such file"),
             (["--model", str(thinker_dir), "--video-audio", str(media["hum"])], "--video-audio needs a --video"),
             (["--model", str(thinker_dir), "--image", str(media["image"]), "--max-new-tokens", "600"],
              "exceeds the model's context of 512")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["omni", "ask", *args, "--prompt", PROMPT]) == 2
        assert message in capsys.readouterr().err
