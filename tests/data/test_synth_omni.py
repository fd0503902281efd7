"""Multimodal synthetic data: speech (espeak-ng), image QA and narrated digit videos, checked against the files."""

from __future__ import annotations

import hashlib
import json
import math
import re
import wave
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import decode_digit
from omnilm.cli import main
from omnilm.config import ConfigError
from omnilm.data.synth import media
from omnilm.data.synth.media import COLOURS, parse_wav, read_wav, resample, write_wav
from omnilm.data.synth.omni import (
    IMAGE_QUESTIONS,
    SAY_PROMPT,
    TRANSCRIBE_PROMPT,
    VIDEO_WORDS_QUESTION,
    OmniConfig,
    omni_config,
    write_omni,
)
from omnilm.errors import UserError
from omnilm.recipe.jobs import job_inputs, run_job

needs_espeak = pytest.mark.skipif(not media.espeak_available(),
                                  reason="espeak-ng is not installed (Debian package espeak-ng)")


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def wav_info(path: Path) -> tuple[int, int, int, int]:
    with wave.open(str(path), "rb") as handle:
        return handle.getframerate(), handle.getnchannels(), handle.getsampwidth(), handle.getnframes()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".wav", ".png", ".jsonl")
            and "bios" not in p.parts}


# ---------------------------------------------------------------------------------------------- no espeak-ng needed


@pytest.mark.parametrize("dst", [16_000, 16_001, 8_000, 44_100])
def test_resample_keeps_the_band_and_removes_what_would_alias(dst: int) -> None:
    src = 22_050
    t = np.arange(src) / src
    for freq in (440.0, 1_000.0, 3_000.0):
        out = resample(np.sin(2 * np.pi * freq * t), src, dst)
        assert len(out) == math.ceil(src * dst / src)
        expected = np.sin(2 * np.pi * freq * np.arange(len(out)) / dst)
        inner = slice(100, -100)  # the ends see the zeros outside the signal
        assert np.abs(out[inner] - expected[inner]).max() < 1e-3, (freq, dst)
    if dst < src:
        # Above the new Nyquist frequency: plain decimation would fold it back at full strength.
        above = 0.5 * (dst / 2 + src / 2)
        out = resample(np.sin(2 * np.pi * above * t), src, dst)
        assert np.sqrt(np.mean(out[100:-100] ** 2)) < 1e-3


def test_wav_round_trip_and_streaming_header(tmp_path: Path) -> None:
    samples = np.random.default_rng(0).uniform(-0.9, 0.9, 5000)
    write_wav(tmp_path / "a.wav", samples, 16_000)
    assert wav_info(tmp_path / "a.wav") == (16_000, 1, 2, 5000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16_000 and np.abs(back - samples).max() <= 0.5 / 32768 + 1e-9
    # A header whose sizes are streaming placeholders (as espeak-ng --stdout writes it): data runs to the end.
    data = bytearray((tmp_path / "a.wav").read_bytes())
    data[4:8] = data[40:44] = (0x7FFFFFFF).to_bytes(4, "little")
    streamed, rate = parse_wav(bytes(data))
    assert rate == 16_000 and np.array_equal(streamed, back)
    write_wav(tmp_path / "b.wav", back, 16_000)  # float -> int16 -> float -> int16 is stable
    assert (tmp_path / "b.wav").read_bytes() == (tmp_path / "a.wav").read_bytes()


def test_seven_segment_digits_read_back() -> None:
    for digit in range(10):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        media.draw_digit(ImageDraw.Draw(image), digit, (20, 8, 20, 40), COLOURS["blue"])
        assert decode_digit(image, [20, 8, 20, 40], COLOURS["blue"]) == digit


def test_config_errors_and_missing_espeak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        omni_config("smoke", {"voices": 3})
    with pytest.raises(UserError, match="unknown scale"):
        omni_config("huge")
    with pytest.raises(UserError, match="disjoint"):
        write_omni(omni_config("smoke", {"eval_variants": "m3,m1"}), tmp_path / "x")
    monkeypatch.setattr(media, "ESPEAK", "espeak-ng-that-does-not-exist")
    assert not media.espeak_available()
    with pytest.raises(UserError, match="apt-get install espeak-ng"):
        write_omni(omni_config("smoke"), tmp_path / "y")


# ---------------------------------------------------------------------------------------------- generated data


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not media.espeak_available():
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng)")
    out = tmp_path_factory.mktemp("omni")
    write_omni(omni_config("smoke"), out)
    return out


def records(out: Path) -> list[dict[str, Any]]:
    return read(out / "train.jsonl") + read(out / "eval.jsonl")


@needs_espeak
def test_files_exist_and_decode(smoke: Path) -> None:
    config = OmniConfig(**json.loads((smoke / "config.json").read_text()))
    tasks = defaultdict(int)
    for record in records(smoke):
        tasks[record["task"]] += 1
        user, assistant, *more = record["messages"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": record["answer"]}
        # Further turns (training images only) are text questions about the same picture, then their answers.
        assert not more or (record["task"], record["split"]) == ("image_qa", "train")
        assert [m["role"] for m in more] == ["user", "assistant"] * (len(more) // 2)
        assert all(isinstance(m["content"], str) for m in more)
        for part in user["content"]:
            if part["type"] == "audio":
                rate, channels, width, frames = wav_info(smoke / part["audio"])
                assert (rate, channels, width) == (16_000, 1, 2) and frames > 0.3 * rate
                assert frames / rate == pytest.approx(record["audio_seconds"], abs=1e-3)
            elif part["type"] == "image":
                assert Image.open(smoke / part["image"]).size == (config.image_size, config.image_size)
            elif part["type"] == "video":
                meta = json.loads((smoke / part["video"] / "video.json").read_text())
                assert len(meta["frames"]) == round(meta["duration"] * meta["fps"])
                for name in meta["frames"]:
                    assert Image.open(smoke / part["video"] / name).size == (config.video_size, config.video_size)
                rate, channels, width, frames = wav_info(smoke / part["audio"])
                assert (rate, channels, width) == (16_000, 1, 2)
                assert frames == round(meta["duration"] * rate)
            elif record["task"] in ("transcribe", "video_words"):  # the answer is what the voice said
                prompt = TRANSCRIBE_PROMPT if record["task"] == "transcribe" else VIDEO_WORDS_QUESTION
                assert part == {"type": "text", "text": prompt} and record["answer"] == record["text"]
            else:
                assert part["type"] == "text" and part["text"] == record["text"]
    stats = json.loads((smoke / "stats.json").read_text())
    speech = read(smoke / "speech.jsonl")
    spoken = Counter(r["task"] for r in speech)
    assert {t: sum(s.values()) for t, s in stats["records"].items()} == tasks | spoken
    assert set(spoken) == {"speak", "say"}
    assert set(tasks) == {"spoken_qa", "transcribe", "text_qa", "image_qa", "video_qa", "video_word_at",
                          "video_words", "video_digits", "video_timeline"}
    assert tasks["transcribe"] == sum(r["task"] == "spoken_qa" and r["split"] == "train" for r in records(smoke))
    assert stats["records"]["image_qa"] == {"train": config.train_images, "eval": config.eval_images}


@needs_espeak
def test_spoken_questions_are_the_bios_qa_in_disjoint_voices(smoke: Path) -> None:
    config = OmniConfig(**json.loads((smoke / "config.json").read_text()))
    qa = read(smoke / "bios" / "qa.jsonl")
    spoken = [r for r in records(smoke) if r["task"] == "spoken_qa"]
    text = [r for r in records(smoke) if r["task"] == "text_qa"]
    voices: dict[str, set[str]] = defaultdict(set)
    for record in spoken + text:
        source = qa[int(record["item"].removeprefix("qa"))]
        # The same question, answer and person as the text SFT's QA pair (unseen people: "I don't know.").
        assert record["text"] == source["messages"][0]["content"]
        assert record["answer"] == source["answer"] == source["messages"][1]["content"]
        assert (record["person_id"], record["attribute"], record["qa_split"]) == (
            source["person_id"], source["attribute"], source["split"])
        if record["split"] == "train":
            assert record["qa_split"] == "train"  # facts held out of the text SFT stay out of speech training
        if record["task"] == "spoken_qa":
            voices[record["split"]].add(record["voice"])
    assert voices["train"] and voices["eval"] and not voices["train"] & voices["eval"]
    variants = {split: {v.split(":")[0].split("+")[1] for v in names} for split, names in voices.items()}
    assert variants["train"] <= set(config.variants.split(",")) and variants["eval"] <= set(
        config.eval_variants.split(",")) and not variants["train"] & variants["eval"]
    # Every evaluation question is asked both ways, and covers both QA splits and unseen people.
    eval_spoken = {r["item"] for r in spoken if r["split"] == "eval"}
    assert eval_spoken == {r["item"] for r in text if r["split"] == "eval"}
    eval_records = [r for r in spoken if r["split"] == "eval"]
    assert {(r["qa_split"], r["seen"]) for r in eval_records} == {("train", True), ("test", True), ("train", False),
                                                                  ("test", False)}
    facts = {(r["person_id"], r["attribute"]) for r in eval_records}
    assert len(facts) == len(eval_records) == config.spoken_people * 6
    # Each training question is spoken by distinct voices.
    per_item = defaultdict(list)
    for r in spoken:
        if r["split"] == "train":
            per_item[r["item"]].append(r["voice"])
    assert all(len(v) == len(set(v)) == config.train_voices_per_question for v in per_item.values())


@needs_espeak
def test_image_answers_match_the_pixels_and_eval_layouts_are_new(smoke: Path) -> None:
    images = [r for r in records(smoke) if r["task"] == "image_qa"]
    assert {r["kind"] for r in images} == {"colour", "shape", "count", "digit", "position"}
    layouts: dict[str, set[str]] = defaultdict(set)
    for record in images:
        scene = record["scene"]
        layouts[record["split"]].add(json.dumps([scene["objects"], scene.get("digit")], sort_keys=True))
        image = Image.open(smoke / record["messages"][0]["content"][0]["image"]).convert("RGB")
        for obj in scene["objects"]:  # objects do not cover one another: each centre shows its own colour
            assert image.getpixel((obj["x"], obj["y"])) == COLOURS[obj["colour"]]
        turns = [(record["text"], record["answer"], record["kind"])]
        extra = record["messages"][2:]
        turns += [(q["content"], a["content"], question_kind(q["content"]))
                  for q, a in zip(extra[::2], extra[1::2], strict=True)]
        assert len({question for question, _, _ in turns}) == len(turns)
        for question, answer, kind in turns:
            check_image_answer(image, scene, question, answer, kind)
    assert layouts["train"] and layouts["eval"] and not layouts["train"] & layouts["eval"]
    extra_turns = [len(r["messages"]) // 2 - 1 for r in images if r["split"] == "train"]
    assert max(extra_turns) > 0


def question_kind(question: str) -> str:
    """Which kind of image question this is, from the question templates."""
    [kind] = [kind for kind, templates in IMAGE_QUESTIONS.items() for template in templates
              if re.fullmatch(re.escape(template).replace(r"\{shape\}", r"\w+").replace(r"\{colour\}", r"\w+"),
                              question)]
    return kind


def check_image_answer(image: Image.Image, scene: dict[str, Any], question: str, answer: str, kind: str) -> None:
    """``answer`` is what the pixels say to ``question``."""
    size = image.size[0]
    if kind == "colour":
        [target] = [o for o in scene["objects"] if re.search(rf"\bthe {o['shape']}\b", question)]
        assert answer == target["colour"]
    elif kind == "shape":
        [target] = [o for o in scene["objects"] if f" {o['colour']} " in question or f" {o['colour']}?" in question]
        assert answer == target["shape"] and f"{answer}" not in question
    elif kind == "count":
        [shape] = [s for s in media.SHAPES if f" {s}s" in question]
        assert answer == str(sum(o["shape"] == shape for o in scene["objects"]))
    elif kind == "position":
        [target] = [o for o in scene["objects"] if f" {o['shape']}?" in question]
        x, y = target["x"] / size, target["y"] / size
        side = {"left": x < 1 / 3 and abs(y - 0.5) < 0.15, "right": x > 2 / 3 and abs(y - 0.5) < 0.15,
                "top": y < 1 / 3 and abs(x - 0.5) < 0.15, "bottom": y > 2 / 3 and abs(x - 0.5) < 0.15}
        assert [s for s, holds in side.items() if holds] == [answer]
    else:
        digit = scene["digit"]
        assert answer == str(decode_digit(image, digit["box"], COLOURS[digit["colour"]]))


@needs_espeak
def test_video_answers_follow_the_timeline_and_the_narration(smoke: Path) -> None:
    videos = [r for r in records(smoke) if r["task"] == "video_qa"]
    assert {r["split"] for r in videos} == {"train", "eval"}
    for record in videos:
        folder = smoke / record["video"]
        meta = json.loads((folder / "video.json").read_text())
        assert record["messages"][0]["content"][0] == {"type": "video", "video": record["video"],
                                                       "audio": f"{record['video']}/narration.wav"}
        assert record["text"] == f"Which digit was on screen when the voice said {record['word']}?"
        [said] = [w for w in meta["words"] if w["word"] == record["word"]]
        start, end = said["start"], said["end"]
        # The whole word falls inside one digit's time, with room to spare on both sides.
        [segment] = [s for s in meta["timeline"] if s["start"] < end and start < s["end"]]
        assert segment["start"] + 0.1 < start < end < segment["end"] - 0.1
        assert record["answer"] == str(segment["digit"])
        # The frames on screen while the word is said show that digit.
        for frame in range(math.floor(start * meta["fps"]), math.ceil(end * meta["fps"])):
            image = Image.open(folder / meta["frames"][frame]).convert("RGB")
            assert decode_digit(image, segment["box"], COLOURS[segment["colour"]]) == segment["digit"]
        assert len({s["digit"] for s in meta["timeline"]}) == len(meta["timeline"])  # one answer per word
    # The same videos' parts asked alone: the words said in order, the digits in order, the question turned round.
    by_video: dict[str, list[dict]] = {}
    for record in records(smoke):
        if record["task"].startswith("video_"):
            assert record["messages"][0]["content"][0]["audio"] == f"{record['video']}/narration.wav"
            by_video.setdefault(record["video"], []).append(record)
    for folder, asked in by_video.items():
        meta = json.loads((smoke / folder / "video.json").read_text())
        tasks = Counter(r["task"] for r in asked)
        assert tasks == {"video_qa": len(meta["words"]), "video_word_at": len(meta["words"]), "video_words": 1,
                         "video_digits": 1, "video_timeline": 1}
        [words] = [r for r in asked if r["task"] == "video_words"]
        said = " ".join(w["word"] for w in sorted(meta["words"], key=lambda w: w["start"]))
        assert words["answer"] == words["text"] == said  # text: the words said, as for transcription
        [digits] = [r for r in asked if r["task"] == "video_digits"]
        assert digits["answer"] == " ".join(str(s["digit"]) for s in meta["timeline"])
        # Both in time order: each segment's digit, then the word whose sound starts while it is shown.
        [timeline] = [r for r in asked if r["task"] == "video_timeline"]
        segments = [s.split(" ") for s in timeline["answer"].split(", ")]
        assert [s[0] for s in segments] == digits["answer"].split(" ")
        for shown, segment in zip(meta["timeline"], segments, strict=True):
            heard = [w["word"] for w in meta["words"] if shown["start"] < w["start"] < shown["end"]]
            assert segment[1:] == heard
        # Turned round: the word said while a digit was shown is the word whose video_qa answer is that digit.
        digit_of = {r["word"]: r["answer"] for r in asked if r["task"] == "video_qa"}
        for record in (r for r in asked if r["task"] == "video_word_at"):
            assert record["text"] == f"What did the voice say while {digit_of[record['word']]} was on screen?"
            assert record["answer"] == record["word"]
    # The narration is silent except where the words are said.
    for folder in {r["video"] for r in videos}:
        meta = json.loads((smoke / folder / "video.json").read_text())
        samples, rate = read_wav(smoke / folder / "narration.wav")
        spoken = np.zeros(len(samples), dtype=bool)
        for w in meta["words"]:
            span = samples[round(w["start"] * rate):round(w["end"] * rate)]
            assert np.abs(span).max() > 0.05 and np.sqrt(np.mean(span ** 2)) > 0.01
            spoken[round(w["start"] * rate):round(w["end"] * rate)] = True
        assert not np.any(samples[~spoken])


@needs_espeak
def test_narration_clips_cover_every_word_in_every_training_voice(smoke: Path) -> None:
    """narration.jsonl lists each narration word in each training voice, and its clips are the very sound the
    training videos' narrations are made of (what fresh videos are assembled from)."""
    from omnilm.data.synth.omni import WORDS, read_narration_clips

    stats = json.loads((smoke / "stats.json").read_text())
    listed = read(smoke / "narration.jsonl")
    assert sorted((r["word"], r["voice"]) for r in listed) == sorted(
        (w, v) for w in WORDS for v in stats["voices"]["train"])
    assert {r["split"] for r in listed} == {"train"}
    for record in listed:  # a transcription record of its clip: CTC data for the audio encoder
        assert record["messages"][0]["content"][0] == {"type": "audio", "audio": record["audio"]}
        assert record["messages"][1]["content"] == record["text"] == record["word"]
    clips = read_narration_clips(smoke / "narration.jsonl")
    assert all(len(clip) > 1600 and np.abs(clip).max() > 0.05 for words in clips.values() for clip in words.values())
    checked = 0
    for folder in sorted((smoke / "video" / "train").iterdir()):
        meta = json.loads((folder / "video.json").read_text())
        samples, rate = read_wav(folder / "narration.wav")
        for said in meta["words"]:
            clip = clips[meta["voice"]][said["word"]]
            start = round(said["start"] * rate)
            np.testing.assert_allclose(samples[start:start + len(clip)], clip, atol=1e-4)
            checked += 1
    assert checked >= 2


@needs_espeak
def test_deterministic_cached_and_independent_of_workers(smoke: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_omni(omni_config("smoke", {"workers": 1}), again)
    # Same seed: the same records and byte-identical audio, images and frames.
    assert tree_hashes(again) == tree_hashes(smoke)
    # A rerun into the same folder synthesises nothing and removes audio of other settings.
    stale = again / "audio" / "0000000000000000.wav"
    write_wav(stale, np.zeros(100))
    write_omni(omni_config("smoke", {"workers": 1}), again)
    speech = json.loads((again / "stats.json").read_text())["speech"]
    assert speech["synthesised"] == 0 and speech["cached"] == speech["utterances"] > 0
    assert not stale.exists() and tree_hashes(again) == tree_hashes(smoke)
    # Another seed: other voices, layouts and videos.
    other = tmp_path / "other"
    write_omni(omni_config("smoke", {"seed": 1, "bios": str(smoke / "bios")}), other)
    assert read(other / "eval.jsonl") != read(smoke / "eval.jsonl")


@needs_espeak
def test_cli_and_recipe_job(smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = tmp_path / "omni.yaml"
    settings.write_text("train_images: 5\neval_images: 5\ntrain_videos: 1\neval_videos: 1\n")
    out = tmp_path / "cli"
    assert main(["data", "synth", "omni", "--scale", "smoke", "--config", str(settings), "--eval-images", "3",
                 "--bios", str(smoke / "bios"), "--out", str(out)]) == 0
    assert "image qa train" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"]["image_qa"] == {"train": 5, "eval": 3}  # the flag overrides the file
    assert stats["videos"] == {"train": 1, "eval": 1} and not (out / "bios").exists()
    assert main(["data", "synth", "omni", "--scale", "smoke", "--bios", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "x")]) == 2

    # As a recipe job: it reads the biographies job's folder, so it depends on that job.
    root = tmp_path / "run"
    spec = {"job": "synth_omni", "scale": "smoke", "bios": "bios", "train_images": 5, "eval_images": 5,
            "train_videos": 1, "eval_videos": 1}
    assert job_inputs(spec, root) == [str(root / "bios")]
    (root / "bios").mkdir(parents=True)
    (root / "bios" / "qa.jsonl").write_bytes((smoke / "bios" / "qa.jsonl").read_bytes())
    logs: list[str] = []
    result, fingerprint = run_job("omni", spec, root, logs.append, {"job bios": "abc"})
    assert result["image_qa_train"] == 5 and (root / "omni" / "train.jsonl").is_file()
    assert run_job("omni", spec, root, logs.append, {"job bios": "abc"})[1] == fingerprint
    assert "already done" in logs[-1]
    assert run_job("omni", spec, root, logs.append, {"job bios": "new"})[1] != fingerprint
    assert "rerunning" in logs[-2]


@needs_espeak
def test_every_qa_reply_is_spoken_in_the_assistant_voice(smoke: Path) -> None:
    config = OmniConfig(**json.loads((smoke / "config.json").read_text()))
    qa = read(smoke / "bios" / "qa.jsonl")
    speech = [r for r in read(smoke / "speech.jsonl") if r["task"] == "speak"]
    assert len(speech) == len(qa)
    by_answer: dict[str, str] = {}
    for record, source in zip(speech, qa, strict=True):
        assert record["messages"] == [{"role": "user", "content": [{"type": "text", "text": source["messages"][0][
            "content"]}]}, {"role": "assistant", "content": source["answer"]}]
        assert record["voice"] == config.reply_voice and record["task"] == "speak"
        assert record["split"] == ("train" if source["split"] == "train" else "eval")
        rate, channels, width, frames = wav_info(smoke / record["reply_audio"])
        assert (rate, channels, width) == (16_000, 1, 2) and frames > 0.1 * rate
        # One file per distinct reply: the same words in the same voice are the same audio.
        assert by_answer.setdefault(record["answer"], record["reply_audio"]) == record["reply_audio"]


@needs_espeak
def test_fresh_texts_to_say_share_no_answer_and_are_spoken(smoke: Path) -> None:
    config = OmniConfig(**json.loads((smoke / "config.json").read_text()))
    answers = {r["answer"] for r in read(smoke / "bios" / "qa.jsonl")}
    said = [r for r in read(smoke / "speech.jsonl") if r["task"] == "say" and r["item"].startswith("say")]
    assert len(said) == config.say_texts == len({r["text"] for r in said})
    for record in said:
        text = record["text"]
        assert text not in answers and record["split"] == "train" and record["voice"] == config.reply_voice
        assert record["messages"] == [{"role": "user", "content": [{"type": "text", "text": SAY_PROMPT.format(
            text=text)}]}, {"role": "assistant", "content": text}]
        rate, _, _, frames = wav_info(smoke / record["reply_audio"])
        assert rate == 16_000 and frames > 0.1 * rate


@needs_espeak
def test_known_word_texts_recombine_the_words_already_said(smoke: Path) -> None:
    config = OmniConfig(**json.loads((smoke / "config.json").read_text()))
    speech = read(smoke / "speech.jsonl")
    said = {w for r in speech if r["split"] == "train" and not r["item"].startswith("known")
            for w in r["messages"][-1]["content"].split()}
    answers = {r["answer"] for r in read(smoke / "bios" / "qa.jsonl")}
    known = [r for r in speech if r["item"].startswith("known")]
    assert config.say_known and len(known) == config.say_known == len({r["text"] for r in known})
    for record in known:
        words = record["text"].split()
        assert 1 <= len(words) <= config.say_known_words and set(words) <= said and record["text"] not in answers
        assert record["task"] == "say" and record["split"] == "train"
        assert [w for w, _, _ in record["reply_words"]] == words


def test_known_word_texts_draw_words_uniformly_not_by_frequency() -> None:
    """A word said once is drawn as often as one said a hundred times (the point of recombining)."""
    from omnilm.data.synth.omni import known_word_texts

    # 50 words said a hundred times each, 50 said once; 500 texts out of 10,100 possible, so the draw decides.
    common, rare = [f"common{i}" for i in range(50)], [f"rare{i}" for i in range(50)]
    texts = known_word_texts(OmniConfig(say_known=500, say_known_words=2), common * 100 + rare,
                             [{"answer": "rare0"}])
    drawn = Counter(w for text in texts for w in text.split())
    assert len(texts) == len(set(texts)) == 500 and "rare0" not in texts
    assert 0.4 < sum(drawn[w] for w in rare) / sum(drawn.values()) < 0.6  # by frequency it would be about 0.01
    # Three words give 3 + 9 + 27 - 1 (one is an answer) texts at most: asking for more ends, with all of them.
    said = ["common word"] * 100 + ["rare"]
    assert len(known_word_texts(OmniConfig(say_known=100, say_known_words=3), said, [{"answer": "rare"}])) == 38


@needs_espeak
def test_replies_are_spoken_word_by_word_on_the_code_grid(smoke: Path) -> None:
    """Each word's clip sits where ``reply_words`` says (sound inside, silence in the gaps), on the 20 ms grid."""
    from omnilm.data.synth.omni import REPLY_EDGE, WORD_GRID

    config = OmniConfig(**json.loads((smoke / "config.json").read_text()))
    for record in read(smoke / "speech.jsonl"):
        words = record["reply_words"]
        assert [w for w, _, _ in words] == record["messages"][-1]["content"].split()
        samples, rate = read_wav(smoke / record["reply_audio"])
        assert words[0][1] == pytest.approx(REPLY_EDGE)
        assert len(samples) / rate == pytest.approx(words[-1][2] + REPLY_EDGE, abs=1e-4)
        for (_, start, end), following in zip(words, [*words[1:], None], strict=True):
            for edge in (start, end):
                assert edge / WORD_GRID == pytest.approx(round(edge / WORD_GRID), abs=1e-3)
            assert np.abs(samples[round(start * rate):round(end * rate)]).max() > 0.05
            if following is not None:
                assert following[1] - end == pytest.approx(config.word_gap, abs=1e-4)
                assert np.abs(samples[round(end * rate):round(following[1] * rate)]).max() == 0


def test_scene_token_targets_match_the_geometry_and_answer_the_questions() -> None:
    """Each cell's labels against a brute force over points of the drawn discs and digit boxes; and the questions
    read back off the labels (colour, shape, digit and position exactly; counts unless two like objects share a
    cell)."""
    import random

    from omnilm.data.synth.media import SHAPES
    from omnilm.data.synth.omni import IMAGE_KINDS, PLACE_BINS, make_scene, scene_target_count, scene_token_targets

    colours = list(COLOURS)
    pairs = len(SHAPES) * len(colours)
    rng = random.Random(5)
    counted = right_counts = placed = 0
    for index in range(200):
        kind = IMAGE_KINDS[index % len(IMAGE_KINDS)]
        scene, _, answer = make_scene(kind, rng, 112)
        targets = scene_token_targets(scene, 4).reshape(4, 4, -1)
        assert targets.shape[-1] == scene_target_count()
        expected = np.zeros_like(targets)
        for obj in scene["objects"]:
            label = SHAPES.index(obj["shape"]) * len(colours) + colours.index(obj["colour"])
            expected[obj["y"] // 28, obj["x"] // 28, label] = 1
            band = 112 // PLACE_BINS  # the centre's band across the width, then down the height
            places = [2 * pairs + 10 + obj["x"] // band, 2 * pairs + 10 + PLACE_BINS + obj["y"] // band]
            expected[obj["y"] // 28, obj["x"] // 28, places] = 1
            r = 0.7 * obj["r"]
            for dy in np.linspace(-r, r, 121)[1:-1]:
                for dx in np.linspace(-r, r, 121)[1:-1]:
                    if dx * dx + dy * dy < r * r:
                        expected[int((obj["y"] + dy) // 28), int((obj["x"] + dx) // 28), pairs + label] = 1
        if "digit" in scene:
            x, y, w, h = scene["digit"]["box"]
            for row in range(4):
                for col in range(4):
                    if x <= col * 28 + 14 < x + w and y <= row * 28 + 14 < y + h:
                        expected[row, col, 2 * pairs + scene["digit"]["digit"]] = 1
            expected[int((y + h / 2) // 28), int((x + w / 2) // 28), 2 * pairs + scene["digit"]["digit"]] = 1
        # The sampled points come arbitrarily close to the disc's edge but never onto it: equal up to grazing cells.
        assert np.abs(targets - expected).sum() <= 1, index
        centre_cells = targets[..., :pairs].reshape(16, len(SHAPES), len(colours)).max(2).T
        centre = targets[..., :pairs].reshape(16, len(SHAPES), len(colours)).max(0)
        target = scene["objects"][0] if scene["objects"] else None
        if kind == "colour":
            assert colours[int(centre[SHAPES.index(target["shape"])].argmax())] == answer
        elif kind == "shape":
            assert SHAPES[int(centre[:, colours.index(target["colour"])].argmax())] == answer
        elif kind == "digit":
            assert str(int(targets[..., 2 * pairs:2 * pairs + 10].reshape(16, 10).max(0).argmax())) == answer
        elif kind == "position":
            place = targets[..., 2 * pairs + 10:].reshape(16, 2, PLACE_BINS)
            cell = int(centre_cells[SHAPES.index(target["shape"])].argmax())
            if place[cell].sum() == 2:  # the cell holds no other object's centre, whose place would be set too
                placed += 1
                # Off the middle along one axis: the farther one names the side.
                across, down = (float(place[cell, axis].argmax()) - (PLACE_BINS - 1) / 2 for axis in (0, 1))
                if abs(across) > abs(down):
                    side = "left" if across < 0 else "right"
                else:
                    side = "top" if down < 0 else "bottom"
                assert side == answer
        elif kind == "count":
            cells = targets[..., :pairs].reshape(16, len(SHAPES), len(colours))
            for number, shape in enumerate(SHAPES):
                counted += 1
                right_counts += int(cells[:, number].sum()) == sum(o["shape"] == shape for o in scene["objects"])
    assert right_counts >= 0.9 * counted
    assert placed >= 30  # of the 40 position scenes
