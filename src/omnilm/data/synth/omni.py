"""Multimodal synthetic data: spoken questions about the biography people, image QA and narrated digit videos.

Everything is made offline: speech by espeak-ng (many accents, voice variants, speeds and pitches, resampled to
16 kHz), images and video frames by Pillow. Records are chat conversations whose user turn mixes ``text``,
``audio``, ``image`` and ``video`` parts; media are files referenced by paths relative to the output folder.
Files written:

``train.jsonl``   training records of every task, shuffled
``eval.jsonl``    evaluation records: held-out voices, fresh image layouts, fresh videos in held-out voices
``speech.jsonl``  every QA pair as text with its reply spoken in the assistant's voice (``reply_audio``, task
                  ``speak``; split by QA split), and ``say_texts`` fresh texts after "Repeat after me:" (task
                  ``say``, training split): the Talker's and Token2wav's data; replies spoken word by word carry
                  ``reply_words`` ([word, start s, end s])
``narration.jsonl`` every video narration word spoken alone in every training voice, as transcription records
                  (task ``narration``; ``word``, ``voice``, ``audio``): what fresh videos are assembled from while
                  training (``omni_sft`` ``fresh_videos``), and CTC data for the audio encoder
``stats.json``    counts per task and split, the voices of each split, seconds of audio, generation time
``config.json``   the settings used
``audio/``        spoken questions (file name: a hash of text and voice, so reruns reuse them); ``audio/replies/``
                  the replies in the assistant's voice (``audio/words/``: its words, when replies are word by word)
``images/``       ``train/`` and ``eval/`` PNG renders
``video/``        ``train/vNNNN/`` and ``eval/vNNNN/``: PNG frames, ``narration.wav`` and ``video.json``
``bios/``         the biographies the questions are about, when no ``bios`` folder was given

Tasks (``task`` field) and what the evaluations compare:

``spoken_qa``  a question of the biographies' ``qa.jsonl`` spoken: training records cover the people whose QA
               pairs are for training (``qa_split: train``, as in the text SFT) in training voices; evaluation
               records ask one phrasing per person and attribute, for every person, in held-out voices
               (disjoint voice variants), so ``qa_split`` separates trained facts from facts known only from
               pre-training, and ``seen: false`` people must be answered "I don't know."
``transcribe`` (training only) the spoken question written down: "What did the voice say?"
``text_qa``    the same questions as text (``item`` pairs a text record with its spoken ones): the speech gap
``image_qa``   colour, shape, count, digit or position of drawn objects; evaluation layouts never occur in
               training (``scene`` holds the drawing, so answers can be checked against the pixels)
``video_qa``   frames at ``video_fps`` with a digit that changes every second or two, and a narration that says
               distinct words at known times: "Which digit was on screen when the voice said WORD?" needs the
               audio and the frames aligned in time (the audio is the video's own track)
``video_words``   the same videos' parts taken one at a time: the narration written down ("What did the voice
``video_digits``  say?", ``text`` holds the words, as for ``transcribe``), the digits in the order shown, and the
``video_word_at`` question turned round ("What did the voice say while 7 was on screen?")
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import random
import re
import shutil
import time
import wave
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnilm.data.synth.io import write_jsonl
from omnilm.data.synth.media import (
    COLOURS,
    SAMPLE_RATE,
    SHAPES,
    Voice,
    draw_digit,
    draw_shape,
    espeak_version,
    read_wav,
    require_espeak,
    speak,
    trim_silence,
    write_wav,
)
from omnilm.errors import UserError
from omnilm.utils.atomic import write_json_atomic

#: Bump when the speech pipeline (resampling, trimming) changes: cached audio of another version is discarded.
SPEECH_VERSION = 1
SPEECH_STAMP = ".speech-version.json"

TRANSCRIBE_PROMPT = "What did the voice say?"
#: The user turn of a text-to-speech request: the reply is the text itself (``omnilm.omni.speech.Voice.speak_text``).
SAY_PROMPT = "Repeat after me: {text}"

#: Every narration word spoken alone in every training voice, as transcription records (:func:`narration_record`):
#: the clips fresh videos are assembled from (:func:`read_narration_clips`).
NARRATION_FILE = "narration.jsonl"
#: Narration words of the videos: short, common and distinct in sound.
WORDS = ("red", "green", "blue", "yellow", "purple", "cat", "dog", "horse", "tiger", "lion", "zebra", "rabbit",
         "monkey", "eagle", "whale", "snake", "mouse", "bear", "frog", "apple")

IMAGE_KINDS = ("colour", "shape", "count", "digit", "position")
IMAGE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "count": ("How many {shape}s are there?", "Count the {shape}s."),
    "digit": ("Which digit is shown?", "What number is in the picture?"),
    "position": ("Where is the {shape}?", "On which side of the picture is the {shape}?"),
}
POSITIONS = ("left", "right", "top", "bottom")
VIDEO_QUESTION = "Which digit was on screen when the voice said {word}?"
VIDEO_WORDS_QUESTION = "What did the voice say?"
VIDEO_DIGITS_QUESTION = "Which digits were shown?"
VIDEO_WORD_AT_QUESTION = "What did the voice say while {digit} was on screen?"
VIDEO_HEARD_QUESTION = "Did the voice say {word}?"
#: The video written out in time order, each digit shown, then the word said while it was ("3 cat, 7, 1 dog, 5 red").
VIDEO_TIMELINE_QUESTION = "What was shown, and what was said while it was?"
VIDEO_TASKS = ("video_qa", "video_word_at", "video_words", "video_digits", "video_heard", "video_timeline",
               "video_qa_reasoned")
#: Recorded videos' questions: the video question keeps its plain answer (what the evaluations compare with), the
#: reasoned form is drawn with fresh videos (``video_tasks`` of an ``omni_sft`` stage).
RECORDED_VIDEO_TASKS = tuple(task for task in VIDEO_TASKS if task != "video_qa_reasoned")
#: What a conversation shows of a video: all of it (frames and narration), the frames alone, the narration alone
#: (an audio part), the words said written out (:data:`NARRATION_WORDS`: the heard question as a look-up in text), or
#: its timeline written out (:data:`VIDEO_TIMELINE`: each digit shown, then the word said while it was, if any).
VIDEO_SHOWN = ("video", "frames", "sound", "words", "timeline")
NARRATION_WORDS = "The voice said: {words}."
VIDEO_TIMELINE = "Shown, then said: {segments}."


@dataclass
class OmniConfig:
    seed: int = 0
    # Biographies whose QA pairs are spoken: a folder holding qa.jsonl (e.g. a demo run's bios); empty: generate
    # one into OUT/bios with the settings of the synth_bios job of recipe bios_recipe (with preset bios_preset).
    bios: str = ""
    bios_recipe: str = "demo"
    bios_preset: str = ""
    spoken_people: int = 0  # people whose questions are spoken (0: all), taken evenly from QA splits and seen/unseen
    # Voices: accents × variants, each voice a fixed (accent, variant, speed, pitch). Evaluation voices use only
    # eval_variants, training voices only variants: the two sets share no voice variant.
    accents: str = "en-us,en-gb,en-gb-scotland,en-gb-x-rp,en-gb-x-gbclan,en-gb-x-gbcwmd,en-029,en-us-nyc"
    variants: str = ("m1,m2,m4,m5,m7,m8,f1,f3,f4,klatt,klatt2,klatt4,croak,whisper,Alex,Andy,Annie,adam,aunty,"
                     "belinda,benjamin,caleb,david,ed,john,norbert,paul,quincy,robert,travis,victor,zac")
    eval_variants: str = "m3,m6,f2,f5,klatt3,edward,linda,max,michel,steph"
    train_voices: int = 48
    eval_voices: int = 16
    speed_min: int = 140  # words per minute
    speed_max: int = 200
    pitch_min: int = 25  # espeak-ng pitch, 0-99
    pitch_max: int = 75
    train_voices_per_question: int = 2  # each training question spoken by this many training voices
    #: Also train on writing down what a training voice said ("transcribe" records over the same audio): dense
    #: supervision that teaches an audio encoder to say what the words are, which the answers then build on.
    transcribe: bool = True
    #: The assistant's voice (accent+variant:speed:pitch): every QA reply spoken by it goes to ``speech.jsonl``,
    #: what the Talker and Token2wav learn to say. Empty: no spoken replies.
    reply_voice: str = "en-us+m3:s160:p50"
    #: Fresh texts the assistant's voice also says, as "Repeat after me: TEXT" records in ``speech.jsonl`` (task
    #: ``say``, training split): names, dates, cities, universities and employers of people drawn for this alone,
    #: none equal to a QA answer. What lets the speech models say words no training reply has (0: none).
    say_texts: int = 0
    #: Texts recombined from the words the assistant already says (those of the training replies and the say
    #: texts): this many sequences of 1 to ``say_known_words`` words drawn uniformly from that vocabulary, so a word
    #: said once is drawn as often as a common one, in ever new neighbours. Assembled from the word clips already
    #: synthesised (no new espeak-ng run); records like the say texts' (task ``say``). Needs ``reply_word_timing``.
    say_known: int = 0
    say_known_words: int = 4
    #: Replies in the assistant's voice are spoken word by word (each word synthesised alone, silence-trimmed, on a
    #: 20 ms grid, joined by ``word_gap`` seconds of silence), so every record knows when each word is said
    #: (``reply_words``: [word, start s, end s]); the Talker learns to read its text at that pace. False: each
    #: reply synthesised whole, with no timings.
    reply_word_timing: bool = True
    word_gap: float = 0.06
    eval_phrasings_per_fact: int = 1  # evaluation: question phrasings per person and attribute (of 2)
    eval_voices_per_question: int = 1
    # Images: one question per image, the kinds in turn.
    image_size: int = 112
    train_images: int = 3000
    #: Training images carry up to this many questions, one turn each (every object's colour and shape, every
    #: shape's count): more to learn from each image the encoder reads. Evaluation images have one question.
    train_questions_per_image: int = 4
    eval_images: int = 500
    # Videos: video_segments digits, each shown for segment_seconds_min..max (whole frames); words_per_video
    # narration words, each inside a different digit's time with word_margin seconds to spare on both sides.
    video_size: int = 112
    train_videos: int = 300
    eval_videos: int = 50
    video_fps: int = 2
    video_segments: int = 4
    segment_seconds_min: float = 1.0
    segment_seconds_max: float = 2.5
    words_per_video: int = 3
    word_margin: float = 0.15
    workers: int = 2  # processes running espeak-ng (results do not depend on it)


#: Named sizes: ``smoke`` finishes in seconds (tests), ``default`` is the dataclass's defaults.
SCALES: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": {"bios_preset": "smoke", "spoken_people": 8, "train_voices": 4, "eval_voices": 2,
              "train_voices_per_question": 1, "say_texts": 6, "say_known": 4, "train_images": 40, "eval_images": 15,
              "train_videos": 4, "eval_videos": 2, "video_segments": 3, "words_per_video": 2},
}


def omni_config(scale: str = "default", overrides: dict[str, Any] | None = None,
                source: str = "omni config") -> OmniConfig:
    """The config of a named scale (:data:`SCALES`) with ``overrides`` applied; unknown keys are an error."""
    from omnilm.config import from_dict, to_dict

    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r} (known: {', '.join(SCALES)})")
    return from_dict(OmniConfig, to_dict(OmniConfig()) | SCALES[scale] | (overrides or {}), source=source)


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def check_config(config: OmniConfig) -> None:
    """Refuse settings that cannot produce the promised data, naming the setting."""
    train, held_out = set(_names(config.variants)), set(_names(config.eval_variants))
    if not train or not held_out or not _names(config.accents):
        raise UserError("accents, variants and eval_variants must each name at least one")
    if train & held_out:
        raise UserError(f"variants and eval_variants must be disjoint; both have {sorted(train & held_out)}")
    if config.train_voices < config.train_voices_per_question or config.eval_voices < config.eval_voices_per_question:
        raise UserError("each question needs distinct voices: train_voices >= train_voices_per_question and "
                        "eval_voices >= eval_voices_per_question")
    if config.train_voices_per_question < 1 or config.eval_voices_per_question < 1:
        raise UserError("train_voices_per_question and eval_voices_per_question must be at least 1")
    if not 1 <= config.eval_phrasings_per_fact <= 2:
        raise UserError("eval_phrasings_per_fact must be 1 or 2 (the biographies ask each fact in 2 phrasings)")
    if not 0 < config.speed_min <= config.speed_max or not 0 <= config.pitch_min <= config.pitch_max <= 99:
        raise UserError("need 0 < speed_min <= speed_max and 0 <= pitch_min <= pitch_max <= 99")
    if not 56 <= config.image_size <= 224 or not 56 <= config.video_size <= 224:
        raise UserError("image_size and video_size must be 56..224 pixels")
    if config.reply_voice:
        parse_voice(config.reply_voice)
    if config.say_known and (not config.reply_word_timing or config.say_known_words < 1):
        raise UserError("say_known recombines word clips: it needs reply_word_timing and say_known_words >= 1")
    if not 1 <= config.words_per_video <= config.video_segments <= 10:
        raise UserError("need 1 <= words_per_video <= video_segments <= 10 (one distinct digit per segment)")
    if config.words_per_video > len(WORDS):
        raise UserError(f"words_per_video is at most {len(WORDS)}")
    if config.video_fps < 1 or not 0 < config.segment_seconds_min <= config.segment_seconds_max:
        raise UserError("need video_fps >= 1 and 0 < segment_seconds_min <= segment_seconds_max")


# ---------------------------------------------------------------------------------------------- voices


def parse_voice(name: str) -> Voice:
    """The voice named ``accent+variant:sSPEED:pPITCH`` (:attr:`Voice.name`'s format)."""
    found = re.fullmatch(r"([\w-]+)\+([\w-]+):s(\d+):p(\d+)", name.strip())
    if not found:
        raise UserError(f"voice {name!r} is not of the form accent+variant:sSPEED:pPITCH (e.g. en-us+m3:s160:p50)")
    accent, variant, speed, pitch = found.groups()
    return Voice(accent, variant, int(speed), int(pitch))


def make_voices(config: OmniConfig) -> dict[str, list[Voice]]:
    """Training and evaluation voices: distinct (accent, variant, speed, pitch) tuples, the evaluation ones
    built only from ``eval_variants``."""
    rng = random.Random(config.seed * 1_000_003 + 11)
    accents = _names(config.accents)
    voices: dict[str, list[Voice]] = {}
    for split, variants, count in (("train", _names(config.variants), config.train_voices),
                                   ("eval", _names(config.eval_variants), config.eval_voices)):
        chosen: dict[str, Voice] = {}
        # Cycle through variants so that every variant is used before any is used twice.
        order: list[str] = []
        for _ in range(count * 50):
            if not order:
                order = list(variants)
                rng.shuffle(order)
            voice = Voice(rng.choice(accents), order.pop(), rng.randint(config.speed_min, config.speed_max),
                          rng.randint(config.pitch_min, config.pitch_max))
            chosen.setdefault(voice.name, voice)
            if len(chosen) == count:
                break
        if len(chosen) < count:
            raise UserError(f"could not make {count} distinct {split} voices; widen the speed or pitch range")
        voices[split] = list(chosen.values())
    return voices


# ---------------------------------------------------------------------------------------------- speech jobs


@dataclass(frozen=True)
class SpeechJob:
    """One utterance to synthesise into ``path`` (relative to the output folder); ``pad`` seconds of the
    silence around the speech are kept (0: the clip starts and ends with the word, for exact timing)."""

    text: str
    voice: Voice
    pad: float
    folder: str

    @property
    def path(self) -> str:
        """Named by what is spoken and by whom, so that a rerun finds the file it already made."""
        key = hashlib.sha1(f"{self.text}\n{self.voice.name}\n{self.pad}".encode()).hexdigest()[:16]
        return f"{self.folder}/{key}.wav"


def _wav_seconds(path: Path) -> float | None:
    """Duration of a complete cached wav, or None when it is missing or unreadable."""
    try:
        with wave.open(str(path), "rb") as handle:
            if handle.getframerate() != SAMPLE_RATE or handle.getnchannels() != 1 or handle.getnframes() == 0:
                return None
            return handle.getnframes() / SAMPLE_RATE
    except (OSError, EOFError, wave.Error):
        return None


def _run_speech_job(args: tuple[SpeechJob, str]) -> tuple[str, float, bool]:
    """Synthesise one job unless its file exists; returns (path, seconds, whether it was cached)."""
    job, root = args
    target = Path(root) / job.path
    seconds = _wav_seconds(target)
    if seconds is not None:
        return job.path, seconds, True
    samples = trim_silence(speak(job.text, job.voice), SAMPLE_RATE, pad=job.pad)
    if len(samples) == 0:
        raise RuntimeError(f"espeak-ng produced silence for {job.text!r} in voice {job.voice.name}")
    write_wav(target, samples)
    return job.path, len(samples) / SAMPLE_RATE, False


def synthesise(jobs: list[SpeechJob], root: Path, workers: int) -> tuple[dict[str, float], int]:
    """Run the distinct ``jobs`` (in ``workers`` processes); returns seconds per path and how many were cached."""
    unique = list({job.path: job for job in jobs}.values())
    args = [(job, str(root)) for job in unique]
    if workers > 1 and len(args) > 1:
        # spawn: a clean interpreter per worker whatever threads the caller has started.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap_unordered(_run_speech_job, args, chunksize=16))
    else:
        results = [_run_speech_job(a) for a in args]
    return {path: seconds for path, seconds, _ in results}, sum(cached for _, _, cached in results)


def prepare_audio_cache(folder: Path) -> None:
    """Keep cached speech only if it was made by this espeak-ng and this pipeline version."""
    stamp = {"espeak": espeak_version(), "pipeline": SPEECH_VERSION, "rate": SAMPLE_RATE}
    marker = folder / SPEECH_STAMP
    if folder.exists():
        try:
            current = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            current = None
        if current != stamp:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, stamp)


def prune(folder: Path, keep: set[Path]) -> int:
    """Delete the wav files under ``folder`` that are not in ``keep`` (left over from other settings)."""
    removed = 0
    for path in folder.rglob("*.wav"):
        if path.resolve() not in keep:
            path.unlink()
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- spoken QA


def bios_folder(config: OmniConfig, out: Path) -> Path:
    """The biographies folder: ``config.bios``, or one generated into ``out/bios`` like the recipe's."""
    if config.bios:
        folder = Path(config.bios)
        if not (folder / "qa.jsonl").is_file():
            raise UserError(f"bios folder {folder} has no qa.jsonl (make one with `omnilm data synth bios`)")
        return folder
    from omnilm.config import from_dict
    from omnilm.data.synth.bios import BiosConfig, write_bios
    from omnilm.recipe.recipe import load_recipe

    recipe = load_recipe(config.bios_recipe, config.bios_preset or None)
    specs = [spec for spec in recipe.prepare.values() if spec.get("job") == "synth_bios"]
    if not specs:
        raise UserError(f"recipe {config.bios_recipe!r} has no synth_bios job to copy the biographies from")
    settings = {k: v for k, v in specs[0].items() if k not in ("job", "out")}
    folder = out / "bios"
    write_bios(from_dict(BiosConfig, settings, source=f"{recipe.source}: synth_bios job"), folder)
    return folder


def read_qa(folder: Path) -> list[dict[str, Any]]:
    """The QA pairs of a biographies folder, each with ``item`` (its line number) and ``question``."""
    pairs = []
    with open(folder / "qa.jsonl", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle):
            record = json.loads(line)
            question = record["messages"][0]["content"]
            pairs.append(record | {"item": f"qa{line_number:05d}", "question": question})
    return pairs


def select_people(pairs: list[dict[str, Any]], limit: int) -> set[int]:
    """``limit`` people (0: all), taken in turn from the groups (QA split × seen) so that each is represented."""
    groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for pair in pairs:
        group = groups[(pair["split"], pair["seen"])]
        if pair["person_id"] not in group:
            group.append(pair["person_id"])
    everyone = {p for group in groups.values() for p in group}
    if limit <= 0 or limit >= len(everyone):
        return everyone
    chosen: list[int] = []
    queues = [list(group) for _, group in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return set(chosen)


def reply_records(config: OmniConfig, pairs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[SpeechJob]]:
    """Every QA pair of every person as a text chat whose reply the assistant's voice speaks (``reply_audio``):
    what the Talker and Token2wav learn from. Split by the QA split: replies of ``qa_split: test`` facts are never
    voiced in training, so intelligibility is measured on sentences the speech models did not hear."""
    if not config.reply_voice:
        return [], []
    assistant = parse_voice(config.reply_voice)
    records, jobs = [], []
    for pair in pairs:
        path, reply_jobs = reply_audio(config, pair["answer"], assistant)
        jobs += reply_jobs
        records.append({"messages": [{"role": "user", "content": [{"type": "text", "text": pair["question"]}]},
                                     {"role": "assistant", "content": pair["answer"]}],
                        "task": "speak", "reply_audio": path, "voice": assistant.name}
                       | _qa_common(pair, "train" if pair["split"] == "train" else "eval"))
    return records, jobs


#: The time grid of word-by-word replies: one speech code (50 per second), so word boundaries fall between codes.
WORD_GRID = 0.02
#: Silence before the first and after the last word of a word-by-word reply.
REPLY_EDGE = 0.04


def reply_audio(config: OmniConfig, text: str, voice: Voice) -> tuple[str, list[SpeechJob]]:
    """Where the assistant's spoken ``text`` goes, and the speech jobs it needs: the whole text, or (with
    ``reply_word_timing``) each word alone, joined later by :func:`assemble_replies`."""
    if not config.reply_word_timing:
        job = SpeechJob(text, voice, 0.05, "audio/replies")
        return job.path, [job]
    key = hashlib.sha1(f"{text}\n{voice.name}\nwords:{config.word_gap}".encode()).hexdigest()[:16]
    return f"audio/replies/{key}.wav", [word_job(word, voice) for word in text.split()]


def _on_grid(samples: np.ndarray) -> np.ndarray:
    step = round(WORD_GRID * SAMPLE_RATE)
    return np.concatenate([samples, np.zeros(-len(samples) % step, dtype=samples.dtype)])


def assemble_replies(config: OmniConfig, records: list[dict[str, Any]], out: Path) -> None:
    """Write the word-by-word reply of each record (its words' clips on the 20 ms grid, ``word_gap`` apart) and
    set its ``reply_words`` timings; a reply already written is read back for its timings' sake only."""
    if not config.reply_word_timing or not records:  # no assistant voice: nothing to assemble
        return
    voice = parse_voice(config.reply_voice)
    silence = {span: np.zeros(round(span / WORD_GRID) * round(WORD_GRID * SAMPLE_RATE), dtype=np.float32)
               for span in (REPLY_EDGE, config.word_gap)}
    clips: dict[str, np.ndarray] = {}
    for record in records:
        text = record["messages"][-1]["content"]
        pieces, words, at = [silence[REPLY_EDGE]], [], REPLY_EDGE
        for index, word in enumerate(text.split()):
            if word not in clips:
                clips[word] = _on_grid(read_wav(out / word_job(word, voice).path)[0])
            if index:
                pieces.append(silence[config.word_gap])
                at += config.word_gap
            pieces.append(clips[word])
            seconds = len(clips[word]) / SAMPLE_RATE
            words.append([word, round(at, 4), round(at + seconds, 4)])
            at += seconds
        pieces.append(silence[REPLY_EDGE])
        record["reply_words"] = words
        target = out / record["reply_audio"]
        if _wav_seconds(target) is None:
            write_wav(target, np.concatenate(pieces))


def say_texts(config: OmniConfig, pairs: list[dict[str, Any]]) -> list[str]:
    """``config.say_texts`` distinct texts for the assistant to say: every attribute value and the name of people
    drawn from fresh Faker seeds (their own city, company and university pools), none equal to a QA answer."""
    from omnilm.data.synth.bios import BiosConfig, make_people

    answers = {pair["answer"] for pair in pairs}
    texts: dict[str, None] = {}
    seed = config.seed * 1_000_003 + 89
    while len(texts) < config.say_texts:
        for person in make_people(BiosConfig(people=200, seed=seed)):
            for text in (person.name, *person.attributes.values()):
                if text not in answers:
                    texts[text] = None
        seed += 1
    return list(texts)[: config.say_texts]


def known_word_texts(config: OmniConfig, said: list[str], pairs: list[dict[str, Any]]) -> list[str]:
    """``config.say_known`` distinct texts of 1 to ``say_known_words`` words, each word drawn uniformly from the
    vocabulary of ``said`` (the texts the assistant says in training), none equal to a QA answer."""
    vocabulary = sorted({word for text in said for word in text.split()})
    answers = {pair["answer"] for pair in pairs}
    rng = random.Random(config.seed * 1_000_003 + 97)
    texts: dict[str, None] = {}
    # Sampling with replacement from a finite set: stop drawing once new texts have become too rare to find.
    for _ in range(50 * config.say_known):
        if len(texts) == config.say_known or not vocabulary:
            break
        text = " ".join(rng.choices(vocabulary, k=rng.randint(1, config.say_known_words)))
        if text not in answers:
            texts[text] = None
    return list(texts)


def say_records(config: OmniConfig, pairs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[SpeechJob]]:
    """The :func:`say_texts`, then the :func:`known_word_texts` (recombining the words of the training replies and of
    those texts), as training records of the speech models, each spoken in the assistant's voice."""
    if not config.reply_voice or not (config.say_texts or config.say_known):
        return [], []
    assistant = parse_voice(config.reply_voice)
    fresh = say_texts(config, pairs) if config.say_texts else []
    trained = [pair["answer"] for pair in pairs if pair["split"] == "train"]
    known = known_word_texts(config, trained + fresh, pairs) if config.say_known else []
    records, jobs = [], []
    for kind, texts in (("say", fresh), ("known", known)):
        for index, text in enumerate(texts):
            path, say_jobs = reply_audio(config, text, assistant)
            jobs += say_jobs
            records.append({"messages": [{"role": "user", "content": [{"type": "text",
                                                                       "text": SAY_PROMPT.format(text=text)}]},
                                         {"role": "assistant", "content": text}],
                            "task": "say", "reply_audio": path, "voice": assistant.name, "split": "train",
                            "text": text, "answer": text, "item": f"{kind}{index:05d}"})
    return records, jobs


def _qa_common(pair: dict[str, Any], split: str) -> dict[str, Any]:
    return {"split": split, "text": pair["question"], "answer": pair["answer"], "item": pair["item"],
            "person_id": pair["person_id"], "attribute": pair["attribute"], "seen": pair["seen"],
            "qa_split": pair["split"]}


def spoken_records(config: OmniConfig, pairs: list[dict[str, Any]],
                   voices: dict[str, list[Voice]]) -> tuple[list[dict[str, Any]], list[SpeechJob]]:
    """Spoken and text QA records of both splits, and the utterances they need."""
    rng = random.Random(config.seed * 1_000_003 + 23)
    people = select_people(pairs, config.spoken_people)
    pairs = [p for p in pairs if p["person_id"] in people]
    records: list[dict[str, Any]] = []
    jobs: list[SpeechJob] = []

    def spoken(pair: dict[str, Any], split: str, voice: Voice) -> None:
        job = SpeechJob(pair["question"], voice, 0.05, "audio")
        jobs.append(job)
        records.append({"messages": [{"role": "user", "content": [{"type": "audio", "audio": job.path}]},
                                     {"role": "assistant", "content": pair["answer"]}],
                        "task": "spoken_qa", "voice": voice.name} | _qa_common(pair, split))
        if config.transcribe and split == "train":
            records.append({"messages": [{"role": "user", "content": [
                                {"type": "audio", "audio": job.path}, {"type": "text", "text": TRANSCRIBE_PROMPT}]},
                                         {"role": "assistant", "content": pair["question"]}],
                            "task": "transcribe", "voice": voice.name} | _qa_common(pair, split)
                           | {"answer": pair["question"]})

    def text(pair: dict[str, Any], split: str) -> None:
        records.append({"messages": [{"role": "user", "content": [{"type": "text", "text": pair["question"]}]},
                                     {"role": "assistant", "content": pair["answer"]}],
                        "task": "text_qa"} | _qa_common(pair, split))

    # Training: the QA pairs the text SFT trains on, each phrasing in several training voices.
    for pair in pairs:
        if pair["split"] == "train":
            text(pair, "train")
            for voice in rng.sample(voices["train"], config.train_voices_per_question):
                spoken(pair, "train", voice)
    # Evaluation: every person and attribute (trained facts and facts only read in pre-training), in held-out
    # voices, with the same questions as text for the speech/text comparison.
    facts: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for pair in pairs:
        facts[(pair["person_id"], pair["attribute"])].append(pair)
    for phrasings in facts.values():
        for pair in rng.sample(phrasings, min(len(phrasings), config.eval_phrasings_per_fact)):
            text(pair, "eval")
            for voice in rng.sample(voices["eval"], config.eval_voices_per_question):
                spoken(pair, "eval", voice)
    return records, jobs


# ---------------------------------------------------------------------------------------------- images


def _background(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(225, 255), rng.randint(225, 255), rng.randint(225, 255))


def _place(rng: random.Random, size: int, r: int, taken: list[tuple[int, int, int]],
           region: str | None = None) -> tuple[int, int] | None:
    """A centre for a disc of radius ``r`` inside the image (and inside ``region`` if given) that keeps two
    pixels clear of every disc in ``taken``; None if none was found."""
    lo, hi = r + 1, size - r - 2
    band = (round(0.38 * size), round(0.62 * size))  # the middle band, across the region's direction
    side = (round(0.3 * size), size - round(0.3 * size))
    ranges = {None: ((lo, hi), (lo, hi)), "left": ((lo, side[0]), band), "right": ((side[1], hi), band),
              "top": (band, (lo, side[0])), "bottom": (band, (side[1], hi))}[region]
    (x0, x1), (y0, y1) = ranges
    if x0 > x1 or y0 > y1:
        return None
    for _ in range(200):
        x, y = rng.randint(x0, x1), rng.randint(y0, y1)
        if all((x - ox) ** 2 + (y - oy) ** 2 >= (r + orad + 2) ** 2 for ox, oy, orad in taken):
            return x, y
    return None


def _objects(rng: random.Random, size: int, specs: list[tuple[str, str]], radius: tuple[float, float],
             taken: list[tuple[int, int, int]], region: str | None = None) -> list[dict[str, Any]] | None:
    """Place one object per (shape, colour) of ``specs``: the first in ``region``, the others anywhere."""
    objects = []
    for i, (shape, colour) in enumerate(specs):
        r = rng.randint(round(radius[0] * size), round(radius[1] * size))
        centre = _place(rng, size, r, taken, region if i == 0 else None)
        if centre is None:
            return None
        taken.append((*centre, r))
        objects.append({"shape": shape, "colour": colour, "x": centre[0], "y": centre[1], "r": r})
    return objects


def make_scene(kind: str, rng: random.Random, size: int) -> tuple[dict[str, Any], str, str]:
    """A random scene of question ``kind`` with its question and answer; the scene says everything drawn."""
    for _ in range(100):  # a layout that does not fit is drawn again
        scene: dict[str, Any] = {"kind": kind, "size": size, "background": list(_background(rng))}
        question = rng.choice(IMAGE_QUESTIONS[kind])
        taken: list[tuple[int, int, int]] = []
        if kind in ("colour", "shape"):
            n = rng.randint(1, 3)
            specs = list(zip(rng.sample(SHAPES, n), rng.sample(list(COLOURS), n), strict=True))
            objects = _objects(rng, size, specs, (0.09, 0.16), taken)
            target = specs[0]
            text = question.format(shape=target[0], colour=target[1])
            answer = target[1] if kind == "colour" else target[0]
        elif kind == "count":
            shape = rng.choice(SHAPES)
            count = rng.randint(1, 5)
            others = [s for s in SHAPES if s != shape]
            specs = [(shape, rng.choice(list(COLOURS))) for _ in range(count)]
            specs += [(rng.choice(others), rng.choice(list(COLOURS))) for _ in range(rng.randint(0, 2))]
            objects = _objects(rng, size, specs, (0.06, 0.1), taken)
            text, answer = question.format(shape=shape), str(count)
        elif kind == "position":
            position = rng.choice(POSITIONS)
            shapes = rng.sample(SHAPES, rng.randint(1, 3))
            specs = [(s, rng.choice(list(COLOURS))) for s in shapes]
            objects = _objects(rng, size, specs, (0.08, 0.12), taken, position)
            text, answer = question.format(shape=shapes[0]), position
            scene["position"] = position
        elif kind == "digit":
            digit = rng.randint(0, 9)
            w = rng.randint(round(0.25 * size), round(0.4 * size))
            h = round(1.8 * w)
            x, y = rng.randint(2, size - w - 2), rng.randint(2, size - h - 2)
            # The digit's box as a disc, so that distractor shapes keep clear of it.
            taken.append((x + w // 2, y + h // 2, math.ceil(math.hypot(w, h) / 2)))
            colour = rng.choice(list(COLOURS))
            distractors = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(rng.randint(0, 1))]
            objects = _objects(rng, size, distractors, (0.06, 0.09), taken)
            scene["digit"] = {"digit": digit, "colour": colour, "box": [x, y, w, h]}
            text, answer = question, str(digit)
        else:
            raise ValueError(f"unknown image question kind {kind!r}")
        if objects is not None:
            scene["objects"] = objects
            return scene, text, answer
    raise RuntimeError(f"could not lay out a {kind!r} scene at {size} px")


def render_scene(scene: dict[str, Any]) -> Any:
    """The ``PIL.Image`` of a scene from :func:`make_scene`."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene["size"], scene["size"]), tuple(scene["background"]))
    draw = ImageDraw.Draw(image)
    if "digit" in scene:
        digit = scene["digit"]
        draw_digit(draw, digit["digit"], tuple(digit["box"]), COLOURS[digit["colour"]])
    for obj in scene["objects"]:
        draw_shape(draw, obj["shape"], obj["x"], obj["y"], obj["r"], COLOURS[obj["colour"]])
    return image


def layout_key(scene: dict[str, Any]) -> str:
    """What makes two layouts the same: the drawn objects and digit (the background tint aside)."""
    return json.dumps({k: scene.get(k) for k in ("kind", "objects", "digit")}, sort_keys=True)


def recorded_layouts(path: str | Path) -> set[str]:
    """Layout keys of the scenes recorded in a jsonl file (none if ``path`` is empty): what fresh renders avoid."""
    if not path:
        return set()
    keys = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            scene = json.loads(line).get("scene") if line.strip() else None
            if scene:
                keys.add(layout_key(scene))
    return keys


def draw_scenes(rng: random.Random, kinds: list[str], size: int, count: int,
                excluded: set[str]) -> list[tuple[dict[str, Any], str, str]]:
    """``count`` fresh (scene, question, answer) of kinds drawn from ``kinds``, none with an ``excluded`` layout."""
    drawn: list[tuple[dict[str, Any], str, str]] = []
    while len(drawn) < count:
        scene, text, answer = make_scene(kinds[rng.randrange(len(kinds))], rng, size)
        if layout_key(scene) not in excluded:
            drawn.append((scene, text, answer))
    return drawn


def image_conversation(image: Any, scene: dict[str, Any], text: str, answer: str, rng: random.Random,
                       questions: int = 1) -> list[dict[str, Any]]:
    """Chat messages about one picture (a path or an image): its question first, then up to ``questions`` - 1 more
    of :func:`scene_questions`, each in its own turn."""
    asked = [(text, answer)]
    if questions > 1:
        asked += [(q, a) for q, a in scene_questions(scene, rng) if q != text][: questions - 1]
    return media_conversation({"type": "image", "image": image}, asked)


def media_conversation(part: dict[str, Any], asked: list[tuple[str, str]],
                       question_first: bool = False) -> list[dict[str, Any]]:
    """Chat messages asking the (question, answer) pairs of ``asked`` in turn, the media ``part`` in the first
    (before its question, or after it with ``question_first``)."""
    messages: list[dict[str, Any]] = []
    for turn, (question, answer) in enumerate(asked):
        content = question
        if turn == 0:
            content = [part, {"type": "text", "text": question}][::-1 if question_first else 1]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def scene_questions(scene: dict[str, Any], rng: random.Random) -> list[tuple[str, str]]:
    """Every question a scene answers unambiguously: each object's colour and shape (their shapes and colours are
    distinct in colour and shape scenes), each shape's count in count scenes; shuffled."""
    objects = scene.get("objects") or []
    pairs: list[tuple[str, str]] = []
    if scene["kind"] in ("colour", "shape"):
        for obj in objects:
            pairs.append((rng.choice(IMAGE_QUESTIONS["colour"]).format(shape=obj["shape"]), obj["colour"]))
            pairs.append((rng.choice(IMAGE_QUESTIONS["shape"]).format(colour=obj["colour"]), obj["shape"]))
    elif scene["kind"] == "count":
        for shape in sorted({obj["shape"] for obj in objects}):
            count = sum(obj["shape"] == shape for obj in objects)
            pairs.append((rng.choice(IMAGE_QUESTIONS["count"]).format(shape=shape), str(count)))
    rng.shuffle(pairs)
    return pairs


#: Objects' places are labelled by which of this many equal bands of the picture's width, and of its height, their
#: centres lie in (8: fine enough to tell the position questions' four sides apart).
PLACE_BINS = 8


def scene_target_count() -> int:
    """Targets per token of :func:`scene_token_targets`."""
    return 2 * len(SHAPES) * len(COLOURS) + 10 + 2 * PLACE_BINS


def scene_token_targets(scene: dict[str, Any], grid: int) -> np.ndarray:
    """Dense labels of a scene cut into ``grid`` × ``grid`` square cells (the vision encoder's merged tokens, in
    raster order): (grid², :func:`scene_target_count`) of 0/1.

    Per cell: the (shape, colour) of every object whose centre lies in it; of every object whose inner disc (70 % of
    its radius, so that a sliver of an edge does not count) overlaps it; and the digit whose box covers the cell's
    centre or whose centre lies in it; and, in the cell of each object's centre, which of :data:`PLACE_BINS` bands
    of the picture's width and of its height that centre lies in. Counting, colour, shape, position and digit
    questions are all answered by reading these labels off the cells.

    The place labels are there because nothing else tells the encoder where a token is: its 2-D rotary positions
    are relative, and TMRoPE gives the language model's width section its slowest frequencies (the 4 columns of a
    112-pixel picture differ by at most 0.01 radians), so "left" and "right" must be written into the object's
    vector itself. A relative encoder can: the share of attention an object keeps for itself depends on how many
    tokens lie on each side of it.
    """
    cell = scene["size"] / grid
    colours = list(COLOURS)
    pairs = len(SHAPES) * len(colours)
    places = 2 * pairs + 10
    targets = np.zeros((grid, grid, scene_target_count()), dtype=np.float32)
    centres = (np.arange(grid) + 0.5) * cell
    for obj in scene.get("objects") or []:
        label = SHAPES.index(obj["shape"]) * len(colours) + colours.index(obj["colour"])
        x, y, r = obj["x"], obj["y"], 0.7 * obj["r"]
        row, col = min(int(y // cell), grid - 1), min(int(x // cell), grid - 1)
        targets[row, col, label] = 1
        # Nearest point of each cell to the centre: the disc overlaps the cell when it is within the radius.
        near_x = np.clip(x, np.arange(grid) * cell, np.arange(1, grid + 1) * cell)
        near_y = np.clip(y, np.arange(grid) * cell, np.arange(1, grid + 1) * cell)
        covered = (near_y[:, None] - y) ** 2 + (near_x[None, :] - x) ** 2 < r * r
        targets[covered, pairs + label] = 1
        band_x, band_y = (min(int(PLACE_BINS * v / scene["size"]), PLACE_BINS - 1) for v in (x, y))
        targets[row, col, [places + band_x, places + PLACE_BINS + band_y]] = 1
    if "digit" in scene:
        x, y, w, h = scene["digit"]["box"]
        inside = ((centres[:, None] >= y) & (centres[:, None] < y + h) & (centres[None, :] >= x)
                  & (centres[None, :] < x + w))
        inside[min(int((y + h / 2) // cell), grid - 1), min(int((x + w / 2) // cell), grid - 1)] = True
        targets[inside, 2 * pairs + scene["digit"]["digit"]] = 1
    return targets.reshape(grid * grid, -1)


def image_records(config: OmniConfig, out: Path) -> list[dict[str, Any]]:
    """Render the images of both splits into ``out/images``; evaluation layouts never occur in training."""
    rng = random.Random(config.seed * 1_000_003 + 37)
    seen: set[str] = set()
    records = []
    for split, count in (("train", config.train_images), ("eval", config.eval_images)):
        for index in range(count):
            kind = IMAGE_KINDS[index % len(IMAGE_KINDS)]
            for _ in range(1000):
                scene, text, answer = make_scene(kind, rng, config.image_size)
                if layout_key(scene) not in seen:
                    break
            else:
                raise UserError(f"ran out of distinct {kind!r} layouts at {config.image_size} px; ask for fewer")
            seen.add(layout_key(scene))
            path = f"images/{split}/i{index:05d}.png"
            render_scene(scene).save(out / path, optimize=False)
            questions = config.train_questions_per_image if split == "train" else 1
            messages = image_conversation(path, scene, text, answer, rng, questions)
            records.append({"messages": messages, "task": "image_qa", "split": split, "kind": kind, "text": text,
                            "answer": answer, "scene": scene})
    return records


# ---------------------------------------------------------------------------------------------- videos


@dataclass
class VideoPlan:
    split: str
    folder: str
    voice: Voice
    digits: list[int]
    words: list[str]  # words[i] is said during the digit of word_segments[i]
    word_segments: list[int]


def plan_videos(config: OmniConfig, voices: dict[str, list[Voice]], rng: random.Random) -> list[VideoPlan]:
    """Voice, digits and narration words of every video (timing waits until the words' lengths are known)."""
    plans = []
    for split, count in (("train", config.train_videos), ("eval", config.eval_videos)):
        for index in range(count):
            digits = rng.sample(range(10), config.video_segments)  # distinct: each word has its own answer
            voice = rng.choice(voices[split])
            plans.append(VideoPlan(split, f"video/{split}/v{index:04d}", voice, digits, *draw_said(config, rng)))
    return plans


def draw_said(config: OmniConfig, rng: random.Random, words: list[str] | tuple[str, ...] = WORDS,
              ) -> tuple[list[str], list[int]]:
    """``words_per_video`` distinct narration words and the segments they are said in (ascending)."""
    return (rng.sample(list(words), config.words_per_video),
            sorted(rng.sample(range(config.video_segments), config.words_per_video)))


def word_job(word: str, voice: Voice) -> SpeechJob:
    """A word spoken alone (a video's narration, a word-by-word reply), trimmed to the speech itself so that its
    start and end times are exact."""
    return SpeechJob(word, voice, 0.0, "audio/words")


@dataclass
class NarratedVideo:
    """A digit video in memory: ``frames`` (PIL images, one per frame at ``fps``), the ``narration`` waveform
    (16 kHz), the ``timeline`` of digits shown and the ``words`` said (word, start and end in seconds)."""

    fps: int
    frames: list[Any]
    narration: np.ndarray
    timeline: list[dict[str, Any]]
    words: list[dict[str, Any]]

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps


def compose_video(config: OmniConfig, digits: list[int], said: dict[int, str], clips: dict[str, np.ndarray],
                  rng: random.Random) -> NarratedVideo:
    """Digits shown in turn, each for ``segment_seconds_min..max`` (whole frames, longer where a word must fit),
    ``said[i]`` spoken inside segment ``i`` with ``word_margin`` to spare; ``clips`` holds each word's waveform."""
    from PIL import Image, ImageDraw

    fps, size = config.video_fps, config.video_size
    lo = max(1, math.ceil(config.segment_seconds_min * fps - 1e-9))
    hi = max(lo, math.floor(config.segment_seconds_max * fps + 1e-9))
    frames_per_segment = []
    for segment in range(len(digits)):
        frames = rng.randint(lo, hi)
        if segment in said:  # long enough for the word with the margin on both sides
            need = len(clips[said[segment]]) / SAMPLE_RATE + 2 * config.word_margin
            frames = max(frames, math.ceil(need * fps - 1e-9))
        frames_per_segment.append(frames)
    video = NarratedVideo(fps, [], np.zeros(round(sum(frames_per_segment) / fps * SAMPLE_RATE)), [], [])
    background = _background(rng)
    for segment, (digit, frames) in enumerate(zip(digits, frames_per_segment, strict=True)):
        first = len(video.frames)
        start, end = first / fps, (first + frames) / fps
        w = rng.randint(round(0.3 * size), round(0.42 * size))
        h = round(1.8 * w)
        box = [rng.randint(2, size - w - 2), rng.randint(2, size - h - 2), w, h]
        colour = rng.choice(list(COLOURS))
        image = Image.new("RGB", (size, size), background)
        draw_digit(ImageDraw.Draw(image), digit, tuple(box), COLOURS[colour])
        video.frames += [image] * frames  # a still digit: the same picture for each of its frames
        video.timeline.append({"digit": digit, "start": start, "end": end, "first_frame": first, "frames": frames,
                               "colour": colour, "box": box})
        if segment in said:
            clip = clips[said[segment]]
            earliest = round((start + config.word_margin) * SAMPLE_RATE)
            latest = round((end - config.word_margin) * SAMPLE_RATE) - len(clip)
            offset = rng.randint(earliest, max(earliest, latest))
            video.narration[offset:offset + len(clip)] += clip
            video.words.append({"word": said[segment], "start": offset / SAMPLE_RATE,
                                "end": (offset + len(clip)) / SAMPLE_RATE})
    return video


def video_questions(video: NarratedVideo, unsaid: list[str] | tuple[str, ...] = (),
                    ) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(task, question, answer, fields) of every question a video answers: for each word said, the digit on screen
    then (``video_qa``), the same question answered by way of the timeline (:func:`reasoned_answer`,
    ``video_qa_reasoned``) and the question turned round (``video_word_at``); then its parts asked alone: the words
    said in order (``video_words``), the digits shown (``video_digits``) and both in time order (``video_timeline``:
    segment by segment, so a segment's word is the one heard while its digit was shown). Given ``unsaid`` words,
    also whether the voice said each word said ("yes") and each of those ("no") (``video_heard``: finding a word
    among the sounds, which the video question does before it looks at the frames)."""
    questions = []
    timeline = timeline_text(video)
    for spoken in video.words:
        digit = str(next(t["digit"] for t in video.timeline if t["start"] <= spoken["start"] < t["end"]))
        span = {"word": spoken["word"], "time": [spoken["start"], spoken["end"]]}
        question = VIDEO_QUESTION.format(word=spoken["word"])
        questions.append(("video_qa", question, digit, span))
        questions.append(("video_qa_reasoned", question, reasoned_answer(video, spoken["word"]), span))
        questions.append(("video_word_at", VIDEO_WORD_AT_QUESTION.format(digit=digit), spoken["word"], span))
    said_text = " ".join(spoken["word"] for spoken in video.words)
    questions.append(("video_words", VIDEO_WORDS_QUESTION, said_text, {"text": said_text}))
    questions.append(("video_digits", VIDEO_DIGITS_QUESTION, " ".join(str(t["digit"]) for t in video.timeline), {}))
    questions.append(("video_timeline", VIDEO_TIMELINE_QUESTION, timeline, {}))
    if unsaid:
        heard = [(spoken["word"], "yes") for spoken in video.words] + [(word, "no") for word in unsaid]
        questions += [("video_heard", VIDEO_HEARD_QUESTION.format(word=word), answer, {"word": word})
                      for word, answer in heard]
    return questions


def narration_record(word: str, voice: str, audio: str) -> dict[str, Any]:
    """A narration word spoken alone, as a transcription record (``text``: the word; CTC data for the audio encoder,
    see ``omni_encoders``) that also names its clip (``audio``, ``word``, ``voice``) for fresh videos."""
    return {"messages": [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                      {"type": "text", "text": TRANSCRIBE_PROMPT}]},
                         {"role": "assistant", "content": word}],
            "task": "narration", "split": "train", "voice": voice, "word": word, "text": word, "audio": audio}


def read_narration_clips(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """voice -> word -> waveform of the narration clips listed in ``path`` (a :data:`NARRATION_FILE`)."""
    path = Path(path)
    clips: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        clips[record["voice"]][record["word"]] = read_wav(path.parent / record["audio"])[0].astype(np.float64)
    if not clips:
        raise UserError(f"{path}: no narration clips")
    return dict(clips)


def build_video(config: OmniConfig, plan: VideoPlan, out: Path, rng: random.Random,
                clips: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Frames, narration and ``video.json`` of one planned video; returns its question records."""
    video = compose_video(config, plan.digits, dict(zip(plan.word_segments, plan.words, strict=True)), clips, rng)
    folder = out / plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    frame_files = []
    for segment in video.timeline:
        buffer = io.BytesIO()
        video.frames[segment["first_frame"]].save(buffer, format="PNG")
        for frame in range(segment["first_frame"], segment["first_frame"] + segment["frames"]):
            frame_files.append(f"frame_{frame:03d}.png")
            (folder / frame_files[-1]).write_bytes(buffer.getvalue())
    write_wav(folder / "narration.wav", video.narration)
    write_json_atomic(folder / "video.json", {
        "fps": video.fps, "size": config.video_size, "frames": frame_files, "duration": video.duration,
        "narration": "narration.wav", "sample_rate": SAMPLE_RATE, "voice": plan.voice.name,
        "timeline": video.timeline, "words": video.words})
    content = [{"type": "video", "video": plan.folder, "audio": f"{plan.folder}/narration.wav"}]
    return [{"messages": [{"role": "user", "content": [*content, {"type": "text", "text": question}]},
                          {"role": "assistant", "content": answer}],
             "task": task, "split": plan.split, "voice": plan.voice.name, "text": question, "answer": answer,
             **fields, "video": plan.folder, "use_audio_in_video": True}
            for task, question, answer, fields in video_questions(video) if task in RECORDED_VIDEO_TASKS]


def video_conversation(video: NarratedVideo, rng: random.Random, questions: int,
                       tasks: tuple[str, ...] = ("video_qa",), show: str = "video",
                       vocabulary: list[str] | tuple[str, ...] = (), question_first: bool = False,
                       ) -> list[dict[str, Any]]:
    """A conversation about an in-memory video: up to ``questions`` of its questions of ``tasks``
    (:func:`video_questions`) in random order, one turn each, what is shown of it (``show``, one of
    :data:`VIDEO_SHOWN`) in the first (after its question with ``question_first``). For ``video_heard``, as many
    words not said as said are drawn from ``vocabulary``."""
    unsaid: list[str] = []
    if "video_heard" in tasks:
        said = {spoken["word"] for spoken in video.words}
        others = sorted(set(vocabulary) - said)
        unsaid = rng.sample(others, min(len(said), len(others)))
    asked = [(q, a) for task, q, a, _ in video_questions(video, unsaid) if task in tasks]
    asked = rng.sample(asked, min(questions, len(asked)))
    return media_conversation(shown_part(video, show), asked, question_first)


def timeline_text(video: NarratedVideo) -> str:
    """Each digit shown, in turn, followed by the word said while it was, if any: "3 cat, 7, 1 dog, 5 red"."""
    return ", ".join(" ".join([str(shown["digit"]), *(w["word"] for w in video.words
                                                      if shown["start"] <= w["start"] < shown["end"])])
                     for shown in video.timeline)


def reasoned_answer(video: NarratedVideo, word: str) -> str:
    """The video question about ``word`` answered by way of the timeline: the timeline written out, then its words
    walked in turn, each with its digit and, beside it, the word asked about and whether they are the same, up to
    that one, then its digit: "3 cat, 7, 1 dog, 5 red. 3 cat, dog? no; 1 dog, dog? yes. So 1." Walking needs no
    look-up of a word among others (which this tokenizer's words, two or three pieces each, made hard), and the word
    asked about is written again beside each word it is compared with: in videos a comparison with the question's
    far-off word went wrong (right 0.72 of the time after a right timeline, against 0.97 on timelines given as
    text), presumably because every word is also in the sound, whose tokens are trained to resemble the words'."""
    walked = []
    for shown in video.timeline:
        for said in (w["word"] for w in video.words if shown["start"] <= w["start"] < shown["end"]):
            walked.append(f"{shown['digit']} {said}, {word}? {'yes' if said == word else 'no'}")
            if said == word:
                return f"{timeline_text(video)}. {'; '.join(walked)}. So {shown['digit']}."
    raise ValueError(f"{word!r} is not said in the video")


def shown_part(video: NarratedVideo, show: str) -> dict[str, Any]:
    """The content part that shows ``video`` as ``show`` says (:data:`VIDEO_SHOWN`)."""
    if show == "video":
        return {"type": "video", "video": video.frames, "fps": video.fps, "audio": video.narration}
    if show == "frames":
        return {"type": "video", "video": video.frames, "fps": video.fps}
    if show == "sound":
        return {"type": "audio", "audio": video.narration}
    if show == "words":
        return {"type": "text", "text": NARRATION_WORDS.format(words=" ".join(w["word"] for w in video.words))}
    if show == "timeline":
        return {"type": "text", "text": VIDEO_TIMELINE.format(segments=timeline_text(video))}
    raise ValueError(f"show: unknown {show!r} (known: {', '.join(VIDEO_SHOWN)})")


# ---------------------------------------------------------------------------------------------- all of it


def write_omni(config: OmniConfig, out: str | Path) -> dict[str, Any]:
    """Generate every multimodal record and file into ``out``; returns record counts (details in stats.json)."""
    began = time.perf_counter()
    check_config(config)
    require_espeak()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    voices = make_voices(config)
    pairs = read_qa(bios_folder(config, out))

    qa_records, jobs = spoken_records(config, pairs, voices)
    speech_records, reply_jobs = reply_records(config, pairs)
    said, say_jobs = say_records(config, pairs)
    speech_records += said
    jobs += reply_jobs + say_jobs
    video_rng = random.Random(config.seed * 1_000_003 + 53)
    plans = plan_videos(config, voices, video_rng)
    word_jobs = {(w, p.voice.name): word_job(w, p.voice) for p in plans for w in p.words}
    # Every narration word in every training voice: what fresh videos are assembled from while training.
    narration = {(w, v.name): word_job(w, v) for v in voices["train"] for w in WORDS}
    word_jobs |= narration
    prepare_audio_cache(out / "audio")
    speech_began = time.perf_counter()
    seconds, cached = synthesise(jobs + list(word_jobs.values()), out, config.workers)
    speech_time = time.perf_counter() - speech_began
    for record in qa_records:
        if record["task"] in ("spoken_qa", "transcribe"):
            record["audio_seconds"] = round(seconds[record["messages"][0]["content"][0]["audio"]], 4)

    for folder in ("images", "video"):  # rendered afresh every run: nothing stale may stay
        shutil.rmtree(out / folder, ignore_errors=True)
    for split in ("train", "eval"):
        (out / "images" / split).mkdir(parents=True)
    images = image_records(config, out)

    video_records = []
    for plan in plans:
        clips = {w: read_wav(out / word_jobs[(w, plan.voice.name)].path)[0].astype(np.float64) for w in plan.words}
        video_records += build_video(config, plan, out, video_rng, clips)
    assemble_replies(config, speech_records, out)
    keep = {(out / job.path).resolve() for job in jobs + list(word_jobs.values())}
    removed = prune(out / "audio", keep | {(out / r["reply_audio"]).resolve() for r in speech_records})

    records = qa_records + images + video_records
    train = [r for r in records if r["split"] == "train"]
    random.Random(config.seed * 1_000_003 + 71).shuffle(train)  # a mixture, not task after task
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", [r for r in records if r["split"] == "eval"])
    write_jsonl(out / "speech.jsonl", speech_records)
    write_jsonl(out / NARRATION_FILE, [narration_record(w, v, job.path) for (w, v), job in narration.items()])
    write_json_atomic(out / "config.json", asdict(config))

    counts: dict[str, dict[str, int]] = defaultdict(Counter)
    audio_seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in records:
        counts[record["task"]][record["split"]] += 1
        if record["task"] == "spoken_qa":
            audio_seconds["spoken_qa"][record["split"]] += record["audio_seconds"]
    for plan in plans:
        meta = json.loads((out / plan.folder / "video.json").read_text(encoding="utf-8"))
        audio_seconds["video_narration"][plan.split] += meta["duration"]
    elapsed = time.perf_counter() - began
    stats = {
        "records": {task: dict(by_split) for task, by_split in counts.items()}
        | {task: dict(Counter(r["split"] for r in speech_records if r["task"] == task))
           for task in sorted({r["task"] for r in speech_records})},
        "videos": dict(Counter(p.split for p in plans)),
        "voices": {split: [v.name for v in vs] for split, vs in voices.items()},
        "audio_seconds": {k: {s: round(v, 1) for s, v in d.items()} for k, d in audio_seconds.items()},
        "speech": {"utterances": len(seconds), "cached": cached, "synthesised": len(seconds) - cached,
                   "seconds": round(speech_time, 2), "stale_files_removed": removed,
                   "utterances_per_second": round((len(seconds) - cached) / max(speech_time, 1e-9), 1),
                   "workers": config.workers, "espeak": espeak_version()},
        "seconds": round(elapsed, 2),
    }
    write_json_atomic(out / "stats.json", stats)
    return {f"{task}_{split}": n for task, by_split in counts.items() for split, n in by_split.items()} | {
        "videos": len(plans), "seconds": round(elapsed, 1)}
