"""Pre-training of a Thinker's new encoders on dense targets, before it learns to answer (stage type ``omni_encoders``).

Trained from scratch on answers alone, small encoders learn slowly: an answer says a few bits about a whole image or
utterance, and the encoder must find out by itself where they came from (a vision encoder with a linear read-out of
the answers: 0.40 of image questions after 3,000 steps). Released Thinkers start from pre-trained towers (a ViT, a
Whisper encoder). This stage gives the new encoders theirs, by two dense objectives drawn in turn (``task_weights``):

* **scenes** (vision): fresh renders (:func:`omnilm.data.synth.omni.make_scene`, drawn on the fly, so no image is seen
  twice); a linear read-out of every merged token, the vectors the language model will read, predicts what is drawn
  in that token's cell (:func:`~omnilm.data.synth.omni.scene_token_targets`: shape and colour of the objects centred
  in it and covering it, the digit covering it, and where in the picture each object's centre lies). With the same
  encoder and steps the answers read off those labels come out right 0.64 of the time (colour 0.95, shape 0.84).
  The place labels are what lets position questions be answered from a token alone: the encoder's 2-D rotary
  positions are relative, so without them its tokens carry no absolute place (read-out of the side: 0.90 with
  them).
* **speech** (audio): CTC (Graves et al., 2006) from the audio tokens to the transcript's tokens, scored against the
  language model's own (frozen) token embeddings plus one learnt blank vector: each audio vector is pulled toward
  the embedding of the word being said, the input the language model already understands.

Only the encoders train; the decoder stays as it is. The stage starts from a text model (which becomes a Thinker with
new encoders, as in ``omni_sft``) or a thinker folder. Its ``final`` is a thinker folder for an ``omni_sft`` stage to
start from; the read-outs are kept beside the weights (``readout.safetensors``) only so that a run can resume.

Data: the stage's ``data`` sources hold the speech records: a user turn with an ``audio`` part (or a ``video`` part
with its ``audio`` track), and the words said in the record's ``text`` field (``omnilm data synth omni``'s
``transcribe``, ``video_words`` and ``narration.jsonl`` records). Each source is a CTC task of its own name, drawn
as often as its ``task_weights`` entry says (e.g. the spoken questions and the videos' narration words apart).
Without sources only scenes are drawn.

Options:

``audio`` ({}) / ``vision`` ({})   encoder fields of a new Thinker (a text model start only), as in ``omni_sft``
``mrope_section`` ([])             its decoder's rotary split, as in ``omni_sft``
``task_weights`` ({})              how often each task is drawn: ``scenes`` and each data source by its name, e.g.
                                   ``{scenes: 1, speech: 1}`` (default: equal; a task of weight 0 is off)
``image_size`` (112)              side of the rendered scenes in pixels
``kinds``                         scene kinds drawn in turn (default: every image question kind)
``exclude_layouts`` ("")          a jsonl file whose records' ``scene`` layouts are never drawn (the evaluation
                                  renders of ``omnilm data synth omni``)
``positive_weight`` (4.0)         weight of the scene labels that are set: a cell holds few of the 80 labels
``image_max_pixels``              pixel budget of an image, as in ``omni_sft`` (saved with the model)
``strict`` (false)                a bad speech record fails the run instead of being skipped and reported
``silence`` ([0, 0])              seconds of silence drawn before and after each audio of the CTC tasks (lo, hi):
                                  an encoder that never heard a pause reads one as words (see ``speech_collate``)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omnilm.config import ConfigError
from omnilm.train.omni_sft import OMNI_OPTIONS, SeededDraws, WeightedBatches, media_budget, starting_thinker
from omnilm.train.stage import StageConfig, register_stage, stage_options
from omnilm.train.trainer import Trainer, TrainResult

READOUT_FILE = "readout.safetensors"
ENCODER_OPTIONS = {"audio": {}, "vision": {}, "mrope_section": [], "task_weights": {}, "image_size": 112, "kinds": [],
                   "exclude_layouts": "", "positive_weight": 4.0,
                   "image_max_pixels": OMNI_OPTIONS["image_max_pixels"], "strict": False, "silence": [0.0, 0.0]}
SCENES = "scenes"  # the vision task; every data source is a speech task of its own name


class SceneBatches(SeededDraws):
    """Batches of fresh scene renders with their labels per merged token."""

    def __init__(self, batch_size: int, image_size: int, kinds: list[str], budget: Any, seed: int, rank: int = 0,
                 excluded: set[str] | None = None) -> None:
        super().__init__(seed, rank)
        self.batch_size, self.image_size, self.kinds, self.budget = batch_size, image_size, kinds, budget
        self.excluded = excluded or set()

    def draw_scenes(self, rng: random.Random) -> list[dict[str, Any]]:
        from omnilm.data.synth.omni import draw_scenes

        return [scene for scene, _, _ in draw_scenes(rng, self.kinds, self.image_size, self.batch_size, self.excluded)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        from omnilm.data.synth.omni import render_scene, scene_token_targets
        from omnilm.omni.vision import preprocess_images

        scenes = self.draw_scenes(self.generator(self.step))
        self.step += 1
        features = preprocess_images([render_scene(s) for s in scenes], min_pixels=self.budget.image_min_pixels,
                                     max_pixels=self.budget.image_max_pixels)
        grids = features.image_grid_thw[:, 1:].tolist()
        if any(h != w for h, w in grids):
            raise ConfigError(f"scenes of {self.image_size} px became non-square grids {grids}")
        # Merged tokens are cells of 2 x 2 patches, in raster order per image.
        targets = np.concatenate([scene_token_targets(s, h // 2) for s, (h, _) in zip(scenes, grids, strict=True)])
        return {"task": SCENES, "pixel_values": features.pixel_values, "image_grid_thw": features.image_grid_thw,
                "targets": torch.from_numpy(targets)}


class EncoderReadouts(nn.Module):
    """The Thinker with the read-outs its encoders learn through: scene labels over the vision encoder's merged
    tokens, and CTC classes (the decoder's token embeddings, a learnt blank) over the audio encoder's tokens. Saved as
    the thinker folder, the read-outs in ``readout.safetensors`` beside it."""

    def __init__(self, thinker: nn.Module, labels: int) -> None:
        super().__init__()
        self.thinker = thinker
        self.scene_head = nn.Linear(thinker.config.vision.out_hidden_size, labels)
        self.ctc_blank = nn.Parameter(torch.zeros(thinker.config.audio.output_dim))

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scene logits (cells, labels), or CTC log-probabilities (audio tokens, B, vocab + 1; blank last)."""
        if batch["task"] == SCENES:
            return self.scene_head(self.thinker.visual(batch["pixel_values"], batch["image_grid_thw"]))
        from omnilm.omni.audio import audio_token_lengths, pack_features

        features, lengths = pack_features(batch["input_features"], batch["feature_attention_mask"])
        tokens = self.thinker.audio_tower(features, lengths)  # (Σ audio tokens, d)
        classes = torch.cat([self.thinker.decoder.tok_emb.weight, self.ctc_blank[None]])  # (vocab + 1, d)
        logits = tokens.float() @ classes.float().T
        per_audio = audio_token_lengths(lengths).tolist()
        padded = nn.utils.rnn.pad_sequence(list(logits.split(per_audio)))  # (T, B, vocab + 1)
        return padded.log_softmax(-1)

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None,
                        state: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        from omnilm.omni.thinker import save_thinker

        state = self.state_dict() if state is None else state
        save_thinker(self.thinker, folder, tokenizer,
                     {k.removeprefix("thinker."): v for k, v in state.items() if k.startswith("thinker.")})
        save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("thinker.")},
                  str(Path(folder) / READOUT_FILE))

    def read_state(self, folder: str | Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from omnilm.omni.thinker import Thinker

        thinker = {f"thinker.{k}": v for k, v in Thinker.read_state(folder).items()}
        return thinker | load_file(str(Path(folder) / READOUT_FILE))


def speech_examples(config: StageConfig, tokenizer: Any, strict: bool,
                    ) -> tuple[dict[str, list[tuple[Path, list[int]]]], Any]:
    """Source name -> (audio path, transcript token ids) of every speech record of that source; a record without
    one audio part (or one video part with its ``audio`` track) and its words is skipped (or, ``strict``, fails the
    run) naming its file and line."""
    from omnilm.data.chat_data import read_records
    from omnilm.data.sources import ReadReport

    report = ReadReport()
    examples: dict[str, list[tuple[Path, list[int]]]] = {}
    for name, source in config.data.items():
        examples[name] = []
        for record, location in read_records([source.path], source.where, strict, report):
            messages = record.get("messages") if isinstance(record.get("messages"), list) else []
            parts = [part for message in messages if isinstance(message, dict) and message.get("role") == "user"
                     and isinstance(message.get("content"), list) for part in message["content"]
                     if isinstance(part, dict)]
            audio = [part["audio"] for part in parts if part.get("type") in ("audio", "video") and "audio" in part]
            text = record.get("text")
            if len(audio) != 1 or not isinstance(text, str) or not text.strip():
                report.skip(location, "a speech record needs one audio track and its words in 'text'", strict)
                continue
            examples[name].append((Path(source.path).parent / audio[0], tokenizer.encode(text, special=False)))
    return examples, report


def speech_collate(examples: list[tuple[Path, list[int]]], cache: dict[Path, torch.Tensor],
                   silence: tuple[float, float] = (0.0, 0.0), seed: int = 0) -> Any:
    """A function from example indices to a padded CTC batch; each audio's log-mel frames are computed once, then
    kept in ``cache`` (the features of a batch are those of each audio alone, padded: see ``audio_features``).

    With ``silence`` (lo, hi) seconds, each audio is drawn with lo..hi seconds of silence before it and, drawn again,
    after it (uniformly, seeded by the batch's indices, so a resumed run draws the same), and its features are
    computed every time from the waveform kept in ``cache`` instead: the audio tokens of a pause are then trained to
    be blanks. Trimmed utterances alone leave the encoder blind to silence: a narration word it reads alone came out
    as '?' once 0.1 s of silence was put around it, and a video's narration, mostly silence, as question text."""
    from omnilm.omni.audio import SAMPLE_RATE, audio_features, load_audio

    lo, hi = silence

    def frames_of(path: Path, rng: random.Random) -> torch.Tensor:
        if hi <= 0:
            if path not in cache:
                features, mask = audio_features([load_audio(path)], trim=True)
                cache[path] = features[0, :, : int(mask.sum())]
            return cache[path]
        if path not in cache:
            cache[path] = load_audio(path)
        before, after = (torch.zeros(round(rng.uniform(lo, hi) * SAMPLE_RATE)) for _ in range(2))
        features, mask = audio_features([torch.cat([before, cache[path], after])], trim=True)
        return features[0, :, : int(mask.sum())]

    def collate(indices: list[int]) -> dict[str, Any]:
        rng = random.Random(hash((seed, *indices)))
        frames = [frames_of(examples[i][0], rng) for i in indices]
        longest = max(f.shape[1] for f in frames)
        features = torch.stack([F.pad(f, (0, longest - f.shape[1])) for f in frames])
        mask = torch.stack([(torch.arange(longest) < f.shape[1]).to(torch.int32) for f in frames])
        targets = [torch.tensor(examples[i][1]) for i in indices]
        return {"task": "speech", "input_features": features, "feature_attention_mask": mask,
                "targets": nn.utils.rnn.pad_sequence(targets, batch_first=True),
                "target_lengths": torch.tensor([len(t) for t in targets])}

    return collate


def encoder_loss(positive_weight: float) -> Any:
    """Objective: binary cross-entropy of every cell's scene labels (set labels weighted by ``positive_weight``),
    or CTC per transcript token."""

    def loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch)
        if batch["task"] == SCENES:
            targets = batch["targets"]
            weight = torch.full((targets.shape[-1],), positive_weight, device=out.device)
            value = F.binary_cross_entropy_with_logits(out.float(), targets, pos_weight=weight)
            exact = ((out > 0) == (targets > 0.5)).all(-1).float().mean()
            return value, {"scene_loss": float(value.detach()), "cells_exact": float(exact)}
        from omnilm.omni.audio import audio_token_lengths

        input_lengths = audio_token_lengths(batch["feature_attention_mask"].sum(-1))
        value = F.ctc_loss(out, batch["targets"], input_lengths, batch["target_lengths"], blank=out.shape[-1] - 1,
                           reduction="mean", zero_infinity=True)
        return value, {"ctc_loss": float(value.detach())}

    return loss


@register_stage("omni_encoders")
def run_omni_encoders_stage(config: StageConfig, out_dir: Path, resume: bool) -> TrainResult:
    from omnilm.data.examples import ExampleLoader
    from omnilm.data.synth.omni import IMAGE_KINDS, recorded_layouts, scene_target_count
    from omnilm.train.checkpoint import latest_checkpoint
    from omnilm.train.distributed import init_distributed
    from omnilm.train.sft import print_read_report
    from omnilm.train.trainer import resolve_device

    options = stage_options(config, ENCODER_OPTIONS)
    if not config.init_from:
        raise ConfigError(f"stage {config.name!r}: omni_encoders starts from a model (init_from)")
    if config.train.distributed != "ddp":
        raise ConfigError(f"stage {config.name!r}: omni_encoders trains with one process or DDP")
    kinds = list(options["kinds"] or IMAGE_KINDS)
    if unknown := sorted(set(kinds) - set(IMAGE_KINDS)):
        raise ConfigError(f"stage {config.name!r}: unknown scene kinds {unknown} (known: {list(IMAGE_KINDS)})")
    weights = dict(options["task_weights"])
    silence = options["silence"]
    if (not isinstance(silence, list | tuple) or len(silence) != 2
            or not all(isinstance(x, int | float) for x in silence) or not 0 <= silence[0] <= silence[1]):
        raise ConfigError(f"stage {config.name!r}: silence is [lo, hi] seconds with 0 <= lo <= hi, got {silence!r}")
    silence = (float(silence[0]), float(silence[1]))
    if SCENES in config.data:
        raise ConfigError(f"stage {config.name!r}: a data source may not be named {SCENES!r} (the scene renders)")
    if unknown := sorted(set(weights) - {SCENES, *config.data}):
        raise ConfigError(f"stage {config.name!r}: unknown task_weights {unknown} "
                          f"(known: {[SCENES, *config.data]})")
    train = config.train
    device = resolve_device(train.device)
    info = init_distributed(device.type)
    built = {key: options[key] for key in ("audio", "vision", "mrope_section")}
    thinker, tokenizer = starting_thinker(config.init_from, OMNI_OPTIONS | built, train.seed)
    thinker.media_budget = media_budget(OMNI_OPTIONS | {"image_max_pixels": options["image_max_pixels"]})
    thinker.requires_grad_(False)
    thinker.visual.requires_grad_(True)
    thinker.audio_tower.requires_grad_(True)
    torch.manual_seed(train.seed)
    model = EncoderReadouts(thinker, scene_target_count()).to(device)
    sources: dict[str, Any] = {SCENES: SceneBatches(train.batch_size, int(options["image_size"]), kinds,
                                                      thinker.media_budget, train.seed, info.rank,
                                                      recorded_layouts(str(options["exclude_layouts"])))}
    if config.data:
        by_source, report = speech_examples(config, tokenizer, bool(options["strict"]))
        if info.is_main:
            print_read_report(config.name, report, sum(map(len, by_source.values())))
        cache: dict[Path, torch.Tensor] = {}
        for name, examples in by_source.items():
            collate = speech_collate(examples, cache, silence, train.seed)
            sources[name] = ExampleLoader(len(examples), train.batch_size, collate,
                                          seed=train.seed, rank=info.rank, world_size=info.world_size)
    # Stream 11: the draw the recipe's recorded run was made with.
    loader = WeightedBatches(sources, {name: float(weights.get(name, 1.0)) for name in sources}, train.seed, 11)
    resume_from = latest_checkpoint(out_dir / "checkpoints") if resume else None
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Each step trains one encoder: the other's parameters are unused.
        model = DistributedDataParallel(model, find_unused_parameters=True)
    trainer = Trainer(model, encoder_loss(float(options["positive_weight"])), loader, train, out_dir, info=info,
                      tokenizer=tokenizer, tokens_per_batch=train.batch_size * train.seq_len)
    return trainer.fit(resume=resume_from is not None)
