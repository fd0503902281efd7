"""Supervised fine-tuning of a Thinker on conversations with audio, images and video (stage type ``omni_sft``).

Data sources are jsonl files of chat records whose user turns mix ``text``, ``audio``, ``image`` and ``video`` parts
(``omnilm data synth omni`` writes them); media paths are relative to the file's folder. Batches are encoded as
they are drawn (media are read then), right-padded; the loss is on the assistant replies, normalised over the
reply tokens of the whole global batch. ``init_from`` is a thinker folder, or a text model folder that becomes a
Thinker (:func:`omnilm.omni.build.thinker_from_decoder`: markers added, new encoders). Which modules train, and
how fast, is the ``train:`` settings' ``frozen_until`` and ``lr_scale`` (e.g. the decoder frozen until step 300).

Options:

``audio`` ({})            AudioEncoderConfig fields of a new audio encoder (a text model start only)
``vision`` ({})           VisionEncoderConfig fields of a new vision encoder (a text model start only)
``mrope_section`` ([])    temporal/height/width split of the decoder's rotary frequencies (default: a thinker start
                          keeps its own, a text model start gets Qwen2.5-Omni's: a quarter temporal). The temporal
                          part holds the highest frequencies: with few of them no attention score can single out "the
                          same second" (4 of head_dim 32's 16 turn 1 s, 25 position ids, by 4.4 radians or more); 8
                          of 16 can (the slowest 0.44)
``image_max_pixels``      pixel budget of an image (default 112·112: tiny renders stay at their size)
``video_min_pixels``      pixel budget of a video frame, lower bound (default 56·56)
``video_max_pixels``      pixel budget of a video frame, upper bound (default 56·56)
``video_fps`` (2.0)       frames per second videos are sampled at
``spec_augment`` (off)    SpecAugment on training audio, e.g. ``{freq_masks: 2, freq_width: 15, time_masks: 2,
                          time_width: 0.1}``: bands of up to ``freq_width`` mel bins and spans of up to
                          ``time_width`` (a fraction) of each audio's frames set to 0. Off by default: at this scale it
                          slowed learning (held-out-voice spoken QA 57 % with it, 73 % without, same steps)
``cache_mb`` (2048)       media read and preprocessed once, kept in memory up to this size (0 = reread every time)
``task_weights`` ({})     how often each record ``task`` is drawn (default: in proportion to its records); every
                          batch holds records of one task, so lengths are alike and little is padding
``fresh_images`` (false)  task ``image_qa`` drawn as fresh renders (:func:`omnilm.data.synth.omni.make_scene`) instead
                          of records: no picture is seen twice. On 3,000 recorded pictures the Thinker learnt them by
                          heart (0.97 of their questions right after 1,800 image steps, 0.73 of fresh ones); needs a
                          ``task_weights`` entry for ``image_qa``
``image_size`` (112)      side of the fresh renders in pixels
``questions_per_image`` (4) questions asked about each fresh render, one turn each (the first is its own kind's)
``exclude_layouts`` ("")  a jsonl file whose records' ``scene`` layouts are never drawn (the evaluation renders)
``fresh_videos`` ("")     task ``video_qa`` drawn as fresh narrated videos instead of records: a narration clip file
                          (``narration.jsonl`` of ``omnilm data synth omni``), whose folder's ``config.json`` sets the
                          videos' size, timing and words per video; each video asks ``questions_per_video`` of its
                          questions of the kinds ``video_tasks``, one turn each, in random order. Needs a
                          ``task_weights`` entry for ``video_qa``
``questions_per_video`` (3)
``video_tasks`` ([video_qa]) which questions fresh videos ask: ``video_qa`` ("which digit was on screen when the voice
                          said X", one per word), and the parts it joins, ``video_digits`` (the digits in order),
                          ``video_words`` (the words said in order), ``video_word_at`` (the word said while a digit
                          was shown), ``video_heard`` ("Did the voice say X?", yes for the words said, no for as
                          many words not said: finding a word among the sounds), ``video_timeline`` (each digit
                          shown, then the word said while it was, "3 cat, 7, 1 dog, 5 red": the time join written
                          out segment by segment; the video question can be read off the Thinker's own timeline),
                          ``video_qa_reasoned`` (the video question answered by way of the timeline, "3 cat, 7,
                          1 dog, 5 red. 3 cat, dog? no; 1 dog, dog? yes. So 1.": the time join written out, then
                          its words walked up to the one asked about, each beside it)
``silent_videos`` (false) also task ``video_silent``: fresh videos without their sound track asking "Which digits
                          were shown?" (the frames alone: a step costs a third of one with the sound); needs
                          ``fresh_videos`` and a ``task_weights`` entry for ``video_silent``
``one_word_videos`` (false) also task ``video_one_word``: fresh videos whose narration is a single word, asking which
                          digit was on screen when it was said: the time join alone (which sound goes with which
                          frames), without finding the word asked about among others; needs ``fresh_videos`` and a
                          ``task_weights`` entry for ``video_one_word``
``heard_words`` (false)   also task ``heard_words``: "Did the voice say X?" (``video_heard``, one question each) about
                          a fresh narration's words written out ("The voice said: cat dog red."): finding a named
                          word among others in text, which this language model learns in about 1,000 steps. From
                          sound alone it did not learn it (2,000 steps at chance); learnt from text first, it did
                          (``heard_sound`` after ``heard_words``: 0.753 against 0.433, all "yes"). Needs
                          ``fresh_videos`` and a ``task_weights`` entry for ``heard_words``
``heard_sound`` (false)   also task ``heard_sound``: the same question about a fresh narration's sound alone (an
                          audio part, no frames); needs ``fresh_videos`` and a ``task_weights`` entry for it
``timeline_lookup`` (false) also task ``timeline_lookup``: the video question about a fresh video's timeline written
                          out ("Shown, then said: 3 cat, 7, 1 dog, 5 red."), answered as ``video_qa_reasoned`` is
                          ("3 cat, 7, 1 dog, 5 red. 3 cat, dog? no; 1 dog, dog? yes. So 1."): the walk through
                          its own text that the reasoned answer ends with, learnt at the cost of a text step; needs
                          ``fresh_videos`` and a ``task_weights`` entry for it
``video_show`` (video)     what ``video_qa``'s fresh videos show (:data:`omnilm.data.synth.omni.VIDEO_SHOWN`):
                          ``video`` (frames and sound), ``frames``, ``sound``, ``words`` (the words said written
                          out) or ``timeline`` (written out: each digit shown and the word said while it was, "Shown,
                          then said: 3 cat, 7, 1 dog, 5 red."; the video question as a look-up in text, learnt
                          in about 2,000 steps, which did not carry over to the videos: README)
``video_question_first`` (false) fresh videos' first question before the video instead of after it: the sounds
                          then come after the words they are asked about (causal attention lets them look back)
``strict`` (false)        a bad record fails the run instead of being skipped and reported
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ConfigError
from omnilm.data.sources import ReadReport
from omnilm.omni.processor import media_arguments
from omnilm.train.stage import StageConfig, register_stage, stage_options
from omnilm.train.trainer import SummedObjective, Trainer, TrainResult

OMNI_OPTIONS = {"audio": {}, "vision": {}, "mrope_section": [], "image_max_pixels": 112 * 112,
                "video_min_pixels": 56 * 56, "video_max_pixels": 56 * 56, "video_fps": 2.0, "cache_mb": 2048,
                "spec_augment": {}, "task_weights": {}, "fresh_images": False, "image_size": 112,
                "questions_per_image": 4, "exclude_layouts": "", "fresh_videos": "", "questions_per_video": 3,
                "video_tasks": ["video_qa"], "silent_videos": False, "one_word_videos": False,
                "video_question_first": False, "video_show": "video", "heard_words": False, "heard_sound": False,
                "timeline_lookup": False, "strict": False}
FRESH_IMAGE_TASK = "image_qa"
FRESH_VIDEO_TASK = "video_qa"
SILENT_VIDEO_TASK = "video_silent"
ONE_WORD_VIDEO_TASK = "video_one_word"
#: Questions about a fresh video shown otherwise than as a video, one question each: option (and task) -> (what is
#: shown, the question's kind).
SHOWN_TASKS = {"heard_words": ("words", "video_heard"), "heard_sound": ("sound", "video_heard"),
               "timeline_lookup": ("timeline", "video_qa_reasoned")}

def starting_thinker(folder: str | Path, options: dict[str, Any], seed: int) -> tuple[nn.Module, Any]:
    """(Thinker, tokenizer) to start from: a thinker folder as it is, or a text model turned into one."""
    from omnilm.omni.build import thinker_from_decoder
    from omnilm.omni.thinker import is_thinker_folder, load_thinker
    from omnilm.tokenizer import Tokenizer

    if is_thinker_folder(folder):
        return (load_thinker(folder, dtype=torch.float32, mrope_section=options["mrope_section"]).train(),
                Tokenizer.from_dir(folder))
    thinker, tokenizer = thinker_from_decoder(folder, options["audio"], options["vision"], seed,
                                              options["mrope_section"])
    return thinker.train(), tokenizer


def media_budget(options: dict[str, Any]) -> Any:
    from omnilm.omni.config import MediaBudget

    return MediaBudget(image_max_pixels=options["image_max_pixels"], video_min_pixels=options["video_min_pixels"],
                       video_max_pixels=options["video_max_pixels"], video_fps=options["video_fps"])


def read_omni_records(config: StageConfig, strict: bool) -> tuple[list[tuple[dict[str, Any], Path]], ReadReport]:
    """(record, media root) of every record of the stage's sources, after their ``where`` filters."""
    from omnilm.data.chat_data import read_records

    report = ReadReport()
    records = []
    for source in config.data.values():
        for record, location in read_records([source.path], source.where, strict, report):
            if not isinstance(record.get("messages"), list):
                report.skip(location, "record has no messages list", strict)
                continue
            records.append((record, Path(source.path).parent))
    return records, report


def spec_augment(features: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, freq_masks: int = 2,
                 freq_width: int = 15, time_masks: int = 2, time_width: float = 0.1) -> torch.Tensor:
    """``features`` (B, mel, frames) with random mel bands and time spans of each audio's real frames zeroed
    (Park et al., 2019, without time warping)."""
    out = features.clone()
    bins = features.shape[1]
    for row, length in enumerate(mask.sum(-1).tolist()):
        for _ in range(freq_masks):
            width = int(torch.randint(0, freq_width + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(bins - width, 0) + 1, (1,), generator=generator))
            out[row, start:start + width, :length] = 0
        for _ in range(time_masks):
            width = int(torch.randint(0, int(time_width * length) + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(length - width, 0) + 1, (1,), generator=generator))
            out[row, :, start:start + width] = 0
    return out


class WeightedBatches:
    """Batches from one source per step, the source drawn by ``weights`` from a generator seeded by the step and
    ``stream`` (so every process draws the same source at the same step, and draws seeded alike elsewhere stay
    independent); each source resumable, and so the whole."""

    def __init__(self, sources: dict[str, Any], weights: dict[str, float], seed: int, stream: int = 7) -> None:
        import numpy as np

        self.names = sorted(name for name in sources if weights[name] > 0)
        if not self.names:
            raise ConfigError(f"no source to draw batches from: every weight is 0 ({weights})")
        self.sources, self.seed, self.stream, self.step = sources, seed, stream, 0
        total = sum(weights[name] for name in self.names)
        self.probabilities = np.array([weights[name] / total for name in self.names])

    def next_batch(self) -> Any:
        import numpy as np

        rng = np.random.default_rng([self.seed, self.step, self.stream])
        self.step += 1
        return self.sources[self.names[rng.choice(len(self.names), p=self.probabilities)]].next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sources": {name: source.state_dict() for name, source in self.sources.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for name, source in self.sources.items():
            source.load_state_dict(state["sources"][name])


class SeededDraws:
    """A source that draws its batches afresh: step ``s`` on process ``rank`` draws from its own generator (seeded by
    the stage seed, the rank, the step and the source's ``stream``), so a resumed run draws the very batches the
    uninterrupted one would; the step is all its state."""

    stream = ""

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed, self.rank, self.step = seed, rank, 0

    def generator(self, step: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.rank}/{step}{self.stream}")

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class FreshImageBatches(SeededDraws):
    """Conversations about fresh scene renders, encoded by ``collate`` (a list of message lists -> batch)."""

    stream = "/images"

    def __init__(self, batch_size: int, image_size: int, questions: int, collate: Any, seed: int, rank: int = 0,
                 excluded: set[str] | None = None) -> None:
        from omnilm.data.synth.omni import IMAGE_KINDS

        super().__init__(seed, rank)
        self.batch_size, self.image_size, self.questions, self.collate = batch_size, image_size, questions, collate
        self.kinds, self.excluded = list(IMAGE_KINDS), excluded or set()

    def conversations(self, step: int) -> list[list[dict[str, Any]]]:
        from omnilm.data.synth.omni import draw_scenes, image_conversation, render_scene

        rng = self.generator(step)
        return [image_conversation(render_scene(scene), scene, text, answer, rng, self.questions)
                for scene, text, answer in draw_scenes(rng, self.kinds, self.image_size, self.batch_size,
                                                       self.excluded)]

    def next_batch(self) -> dict[str, Any]:
        self.step += 1
        return self.collate(self.conversations(self.step - 1))


class FreshVideoBatches(SeededDraws):
    """Conversations about fresh narrated digit videos (:func:`omnilm.data.synth.omni.compose_video`): a training
    voice, digits and words drawn anew for every video, assembled from ``clips`` (voice -> word -> waveform); ``show``
    says what the conversation shows of each (:data:`omnilm.data.synth.omni.VIDEO_SHOWN`: all of it, the frames,
    the narration, or the words said or the timeline written out)."""

    def __init__(self, batch_size: int, clips: dict[str, dict[str, Any]], config: Any, questions: int,
                 collate: Any, seed: int, rank: int = 0, tasks: tuple[str, ...] = ("video_qa",),
                 show: str = "video", question_first: bool = False) -> None:
        super().__init__(seed, rank)
        self.batch_size, self.clips, self.config, self.questions = batch_size, clips, config, questions
        self.tasks, self.show, self.question_first = tasks, show, question_first
        prefix = {"video": "", "frames": "silent-"}.get(show, f"{show}-")  # earlier streams keep their draws
        self.stream = f"/{prefix}videos/{config.words_per_video}-words"
        self.voices, self.collate = sorted(clips), collate

    def conversations(self, step: int) -> list[list[dict[str, Any]]]:
        from omnilm.data.synth.omni import compose_video, draw_said, video_conversation

        rng, drawn = self.generator(step), []
        for _ in range(self.batch_size):
            clips = self.clips[rng.choice(self.voices)]
            digits = rng.sample(range(10), self.config.video_segments)
            words, segments = draw_said(self.config, rng, sorted(clips))
            video = compose_video(self.config, digits, dict(zip(segments, words, strict=True)), clips, rng)
            drawn.append(video_conversation(video, rng, self.questions, self.tasks, self.show, sorted(clips),
                                            self.question_first))
        return drawn

    def next_batch(self) -> dict[str, Any]:
        self.step += 1
        return self.collate(self.conversations(self.step - 1))


class TaskBatches(WeightedBatches):
    """Batches of one task each: the task drawn at random per step (by ``weights``, default in proportion to its
    records), its records in a seeded, resumable order (an :class:`~omnilm.data.examples.ExampleLoader` per task,
    rank-sharded)."""

    def __init__(self, tasks: dict[str, list[int]], weights: dict[str, float], batch_size: int,
                 collate: Any, seed: int, rank: int, world_size: int, generated: dict[str, Any] | None = None) -> None:
        """``generated``: sources of tasks drawn without records (task -> source), each needing a weight."""
        from omnilm.data.examples import ExampleLoader

        generated = generated or {}
        if both := sorted(set(tasks) & set(generated)):
            raise ConfigError(f"task(s) {both} are drawn fresh: leave their records out of the data")
        if unweighted := sorted(set(generated) - set(weights)):
            raise ConfigError(f"task(s) {unweighted} are drawn fresh and need a task_weights entry")
        unknown = sorted(set(weights) - set(tasks) - set(generated))
        if unknown:
            raise ConfigError(f"task_weights names task(s) {unknown} that no record has (tasks: {sorted(tasks)})")
        loaders = {name: ExampleLoader(len(ids), batch_size, lambda local, ids=ids: collate([ids[i] for i in local]),
                                       seed=seed, rank=rank, world_size=world_size) for name, ids in tasks.items()}
        counts = {name: len(ids) for name, ids in tasks.items()}
        super().__init__(loaders | generated, {name: float(weights.get(name, counts.get(name, 0)))
                                               for name in loaders | generated}, seed)


def fresh_video_material(clip_file: Path) -> tuple[Any, dict[str, dict[str, Any]]]:
    """(video settings, voice -> word -> clip) of the synth run that wrote ``clip_file``: fresh videos are drawn
    like its recorded ones (its ``config.json``: size, timing, words per video)."""
    import json

    from omnilm.data.synth.omni import omni_config, read_narration_clips

    settings = clip_file.parent / "config.json"
    if not clip_file.is_file() or not settings.is_file():
        raise ConfigError(f"fresh_videos: {clip_file} and {settings} must exist (omnilm data synth omni writes them)")
    config = omni_config(overrides=json.loads(settings.read_text(encoding="utf-8")))
    clips = read_narration_clips(clip_file)
    if short := sorted(voice for voice, words in clips.items() if len(words) < config.words_per_video):
        raise ConfigError(f"fresh_videos: voice(s) {short} have fewer than {config.words_per_video} words")
    return config, clips


def fresh_video_source(material: tuple[Any, dict[str, dict[str, Any]]], questions: int, tasks: tuple[str, ...],
                       batch_size: int, collate: Any, seed: int, rank: int, show: str = "video",
                       question_first: bool = False) -> FreshVideoBatches:
    """Fresh videos from ``material`` (:func:`fresh_video_material`: a synth run's video settings and clips)."""
    from omnilm.data.synth.omni import VIDEO_SHOWN, VIDEO_TASKS

    if unknown := sorted(set(tasks) - set(VIDEO_TASKS)):
        raise ConfigError(f"video_tasks: unknown {unknown} (known: {', '.join(VIDEO_TASKS)})")
    if show not in VIDEO_SHOWN:
        raise ConfigError(f"video_show: unknown {show!r} (known: {', '.join(VIDEO_SHOWN)})")
    config, clips = material
    return FreshVideoBatches(batch_size, clips, config, questions, collate, seed, rank, tasks, show, question_first)


def thinker_loss_sums(model: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Summed next-token loss over the reply tokens of a batch (``loss_mask`` 1)."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    scored = torch.zeros_like(mask, dtype=torch.bool)
    scored[:, :-1] = mask[:, 1:] == 1  # the positions whose next token is a reply token
    logits = model(ids, batch["attention_mask"], logits_at=scored, **media_arguments(batch))
    loss = F.cross_entropy(logits.float(), ids[:, 1:][scored[:, :-1]], reduction="sum")
    return {"reply": loss}, {}


def reply_units(batch: dict[str, Any]) -> dict[str, float]:
    return {"reply": float(batch["loss_mask"][:, 1:].sum())}


@register_stage("omni_sft")
def run_omni_sft_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.omni.processor import OmniProcessor
    from omnilm.train.checkpoint import latest_checkpoint
    from omnilm.train.distributed import init_distributed
    from omnilm.train.sft import padding_id, print_read_report
    from omnilm.train.trainer import resolve_device

    options = stage_options(config, OMNI_OPTIONS)
    if not config.init_from:
        raise ConfigError(f"stage {config.name!r}: omni_sft starts from a model (init_from: a thinker or text model)")
    if config.train.distributed != "ddp":
        raise ConfigError(f"stage {config.name!r}: omni_sft trains with one process or DDP")
    train = config.train
    device = resolve_device(train.device)
    info = init_distributed(device.type)
    thinker, tokenizer = starting_thinker(config.init_from, options, train.seed)
    thinker.media_budget = media_budget(options)  # saved with every checkpoint: users size media alike
    thinker = thinker.to(device)
    resume_from = latest_checkpoint(out_dir / "checkpoints") if resume else None
    records, report = read_omni_records(config, bool(options["strict"]))
    if info.is_main:
        print_read_report(config.name, report, len(records))
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget,
                              cache_bytes=int(options["cache_mb"]) << 20)
    pad = padding_id(tokenizer)

    augment = dict(options["spec_augment"] or {})

    def collate_messages(conversations: list[list[dict[str, Any]]],
                         roots: list[Path | None] | None = None) -> dict[str, Any]:
        examples = []
        for index, messages in enumerate(conversations):
            processor.root = roots[index] if roots else None
            examples.append(processor.encode(messages))
        return processor.collate(examples, pad)

    def collate(indices: list[int]) -> dict[str, Any]:
        batch = collate_messages([records[i][0]["messages"] for i in indices], [records[i][1] for i in indices])
        if augment and "input_features" in batch:
            # Seeded by the batch's records: a resumed run draws the same masks.
            generator = torch.Generator().manual_seed(hash((train.seed, *indices)) & 0x7FFFFFFF)
            batch["input_features"] = spec_augment(batch["input_features"], batch["feature_attention_mask"],
                                                   generator, **augment)
        return batch

    tasks: dict[str, list[int]] = {}
    for index, (record, _) in enumerate(records):
        tasks.setdefault(str(record.get("task", "chat")), []).append(index)
    generated = {}
    if options["fresh_images"]:
        from omnilm.data.synth.omni import recorded_layouts

        generated[FRESH_IMAGE_TASK] = FreshImageBatches(
            train.batch_size, int(options["image_size"]), int(options["questions_per_image"]), collate_messages,
            train.seed, info.rank, recorded_layouts(str(options["exclude_layouts"])))
    if options["fresh_videos"]:
        material = fresh_video_material(Path(str(options["fresh_videos"])))  # read once for every source
        first = bool(options["video_question_first"])
        generated[FRESH_VIDEO_TASK] = fresh_video_source(
            material, int(options["questions_per_video"]), tuple(options["video_tasks"]), train.batch_size,
            collate_messages, train.seed, info.rank, str(options["video_show"]), question_first=first)
        if options["silent_videos"]:
            generated[SILENT_VIDEO_TASK] = fresh_video_source(
                material, 1, ("video_digits",), train.batch_size, collate_messages, train.seed, info.rank,
                show="frames", question_first=first)
        if options["one_word_videos"]:
            settings, clips = material
            generated[ONE_WORD_VIDEO_TASK] = fresh_video_source(
                (dataclasses.replace(settings, words_per_video=1), clips), 1, ("video_qa",), train.batch_size,
                collate_messages, train.seed, info.rank, question_first=first)
        for task, (show, kind) in SHOWN_TASKS.items():
            if options[task]:  # one question each: asked several, the Thinker learnt to count its yeses
                generated[task] = fresh_video_source(material, 1, (kind,), train.batch_size, collate_messages,
                                                     train.seed, info.rank, show=show)
    elif drawn := [name for name in ("silent_videos", "one_word_videos", *SHOWN_TASKS) if options[name]]:
        raise ConfigError(f"stage {config.name!r}: {', '.join(drawn)} draw fresh videos: they need fresh_videos")
    loader = TaskBatches(tasks, dict(options["task_weights"]), train.batch_size, collate, train.seed, info.rank,
                         info.world_size, generated)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Unused parameters (an encoder whose media a batch lacks) are normal here.
        thinker = DistributedDataParallel(thinker, find_unused_parameters=True)
    trainer = Trainer(thinker, SummedObjective(thinker_loss_sums, reply_units), loader, train, out_dir, info=info,
                      tokenizer=tokenizer, tokens_per_batch=train.batch_size * train.seq_len)
    return trainer.fit(resume=resume_from is not None)
