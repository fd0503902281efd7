"""Conversations with media in, Thinker inputs out: token ids with placeholders, a loss mask, and media tensors.

A message's ``content`` is a string or a list of parts, as in the OpenAI and Qwen2.5-Omni chat formats:
``{"type": "text", "text": ...}``, ``{"type": "audio", "audio": path or waveform}``, ``{"type": "image", "image":
path, PIL image or array}`` and ``{"type": "video", "video": folder of frames or frames, "fps": ..., "audio": optional
soundtrack}``. The rendering is ChatML with Qwen2.5-Omni's media markers::

    <|im_start|>user\\n<|audio_bos|><|AUDIO|>×n<|audio_eos|>What is this?<|im_end|>\\n<|im_start|>assistant\\n

with one ``<|AUDIO|>`` per 40 ms of sound, one ``<|IMAGE|>`` per merged 28×28 patch, one ``<|VIDEO|>`` per merged
patch of each pair of frames; a video with a soundtrack opens with ``<|vision_bos|><|audio_bos|>`` and alternates
video and audio placeholders in 2-second chunks (what TMRoPE positions them by). As in :func:`encode_chat`, what a
message says is encoded as plain text, so a special-token string in it cannot forge a marker or a turn.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnilm.errors import UserError
from omnilm.omni.audio import MAX_SAMPLES, SAMPLE_RATE, audio_features, audio_token_lengths, load_audio
from omnilm.omni.config import MediaBudget, ThinkerConfig
from omnilm.omni.positions import _chunks, _vision_ids
from omnilm.omni.vision import (
    ImageFeatures,
    VideoFeatures,
    merged_token_counts,
    preprocess_images,
    preprocess_videos,
)
from omnilm.tokenizer.chat import IM_END, IM_START, ROLES

AUDIO, IMAGE, VIDEO = "<|AUDIO|>", "<|IMAGE|>", "<|VIDEO|>"
AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS = "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>"
#: The tokens a text tokenizer gains to become a Thinker's (their ids go into ThinkerConfig).
OMNI_TOKENS = {"audio_token_id": AUDIO, "image_token_id": IMAGE, "video_token_id": VIDEO,
               "audio_start_token_id": AUDIO_BOS, "audio_end_token_id": AUDIO_EOS,
               "vision_start_token_id": VISION_BOS, "vision_end_token_id": VISION_EOS}
HOP_SAMPLES = 160  # one mel frame per 10 ms at 16 kHz
#: The Thinker's media arguments a collated batch may hold (beside input_ids, attention_mask and loss_mask).
MEDIA_KEYS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw", "video_second_per_grid", "use_audio_in_video")


def media_arguments(batch: dict[str, Any]) -> dict[str, Any]:
    """The media keyword arguments of a collated batch, for ``Thinker.forward``."""
    return {key: batch[key] for key in MEDIA_KEYS if key in batch}


@dataclass
class OmniExample:
    """One encoded conversation: ids, the trained-token mask and the media its placeholders stand for."""

    ids: list[int]
    mask: list[int]
    audios: list[torch.Tensor] = field(default_factory=list)  # 16 kHz waveforms, in order (video soundtracks too)
    images: list[ImageFeatures] = field(default_factory=list)  # preprocessed once, when counting placeholders
    videos: list[VideoFeatures] = field(default_factory=list)
    audio_in_video: bool = False


class MediaCache:
    """Media files already read and preprocessed, by path, up to ``max_bytes`` (least recently used go first):
    training reads every file once per epoch, and decoding PNGs and WAVs costs more than the model's step."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        value = make()
        size = sum(t.numel() * t.element_size() for t in _tensors(value))
        if size <= self.max_bytes:
            self.items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self.items.popitem(last=False)
                self.bytes -= dropped
        return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple):
        return [t for item in value for t in _tensors(item)]
    return []


class OmniProcessor:
    """Encodes conversations for a Thinker (``tokenizer`` must hold the markers of :data:`OMNI_TOKENS`).

    With ``cache_bytes`` the media files it reads (and their preprocessed tensors) are kept in memory.
    """

    def __init__(self, tokenizer: Any, config: ThinkerConfig, budget: MediaBudget | None = None,
                 root: str | Path | None = None, cache_bytes: int = 0) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.budget = budget or MediaBudget()
        self.root = Path(root) if root is not None else None
        self.cache = MediaCache(cache_bytes) if cache_bytes else None
        missing = [text for text in (*OMNI_TOKENS.values(), IM_START, IM_END) if tokenizer.token_to_id(text) is None]
        if missing:
            raise UserError(f"the tokenizer lacks the Thinker's special tokens {missing}")
        self.id = {text: tokenizer.token_to_id(text) for text in (*OMNI_TOKENS.values(), IM_START, IM_END)}

    # ------------------------------------------------------------------------------------------ media loading

    def _path(self, value: Any) -> Any:
        if isinstance(value, (str, Path)) and self.root is not None and not Path(value).is_absolute():
            return self.root / value
        return value

    def _cached(self, value: Any, kind: str, make: Callable[[], Any]) -> Any:
        if self.cache is None or not isinstance(value, (str, Path)):
            return make()
        return self.cache.get(f"{kind}:{value}", make)

    def _waveform(self, value: Any) -> torch.Tensor:
        value = self._path(value)
        waveform = self._cached(value, "audio", lambda: load_audio(value)) if isinstance(value, (str, Path)) \
            else torch.as_tensor(value).float()
        if len(waveform) > MAX_SAMPLES:  # the feature extractor keeps 30 s; more would not match the placeholders
            raise UserError(f"audio of {len(waveform) / SAMPLE_RATE:.1f} s is longer than the "
                            f"{MAX_SAMPLES // SAMPLE_RATE} s an audio part may last")
        return waveform

    def _image(self, value: Any) -> Any:
        value = self._path(value)
        if isinstance(value, (str, Path)):
            from PIL import Image

            with Image.open(value) as image:
                return image.convert("RGB")
        return value

    def _video(self, part: dict[str, Any]) -> tuple[Any, float | None]:
        value = self._path(part["video"])
        if isinstance(value, (str, Path)):
            import json

            from omnilm.omni.vision import load_frames

            meta = Path(value) / "video.json"
            fps = json.loads(meta.read_text())["fps"] if meta.is_file() else part.get("fps")
            return load_frames(value), fps
        return value, part.get("fps")

    # ------------------------------------------------------------------------------------------------- encode

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, special=False)

    def _audio_tokens(self, waveform: torch.Tensor) -> list[int]:
        frames = -(-len(waveform) // HOP_SAMPLES)
        count = int(audio_token_lengths(frames))
        return [self.id[AUDIO_BOS]] + [self.id[AUDIO]] * count + [self.id[AUDIO_EOS]]

    def _video_tokens(self, grid: torch.Tensor, seconds: float, waveform: torch.Tensor | None) -> list[int]:
        count = int(merged_token_counts(grid.view(1, 3))[0])
        if waveform is None:
            return [self.id[VISION_BOS]] + [self.id[VIDEO]] * count + [self.id[VISION_EOS]]
        c = self.config
        audio = int(audio_token_lengths(-(-len(waveform) // HOP_SAMPLES)))
        per_chunk = c.position_id_per_seconds * c.seconds_per_chunk
        times = _vision_ids(0, grid.tolist(), c.vision.spatial_merge_size, seconds, c.position_id_per_seconds)[0]
        video_cuts, audio_cuts = _chunks(times, 0, per_chunk), _chunks(torch.arange(audio), 0, per_chunk)
        ids = [self.id[VISION_BOS], self.id[AUDIO_BOS]]
        for j in range(max(len(video_cuts), len(audio_cuts))):
            if j < len(video_cuts):
                ids += [self.id[VIDEO]] * (video_cuts[j][1] - video_cuts[j][0])
            if j < len(audio_cuts):
                ids += [self.id[AUDIO]] * (audio_cuts[j][1] - audio_cuts[j][0])
        return ids + [self.id[AUDIO_EOS], self.id[VISION_EOS]]

    def encode(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> OmniExample:
        """Token ids (with placeholders), the mask of trained tokens (assistant text and its ``<|im_end|>``) and
        the media, in order."""
        example = OmniExample([], [])
        for index, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLES:
                raise UserError(f"message {index}: unknown role {role!r} (allowed: {', '.join(ROLES)})")
            trained = role == "assistant"
            example.ids.append(self.id[IM_START])
            example.ids += self._plain(f"{role}\n")
            example.mask += [0] * (len(example.ids) - len(example.mask))
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list) or not parts:
                raise UserError(f"message {index}: content must be a string or a non-empty list of parts")
            for part in parts:
                ids = self._part(part, example, index)
                example.ids += ids
                example.mask += [int(trained and part.get("type") == "text")] * len(ids)
            example.ids.append(self.id[IM_END])
            example.mask.append(int(trained))
            newline = self._plain("\n")
            example.ids += newline
            example.mask += [0] * len(newline)
        if add_generation_prompt:
            ids = [self.id[IM_START], *self._plain("assistant\n")]
            example.ids += ids
            example.mask += [0] * len(ids)
        return example

    def _part(self, part: dict[str, Any], example: OmniExample, index: int) -> list[int]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise UserError(f"message {index}: a text part needs a string 'text'")
            return self._plain(part["text"])
        if kind == "audio":
            waveform = self._waveform(part["audio"])
            example.audios.append(waveform)
            return self._audio_tokens(waveform)
        if kind == "image":
            b = self.budget
            features = self._cached(self._path(part["image"]), "image", lambda: preprocess_images(
                [self._image(part["image"])], b.image_min_pixels, b.image_max_pixels))
            example.images.append(features)
            count = int(merged_token_counts(features.image_grid_thw)[0])
            return [self.id[VISION_BOS]] + [self.id[IMAGE]] * count + [self.id[VISION_EOS]]
        if kind == "video":
            b = self.budget

            def video_features() -> VideoFeatures:
                frames, fps = self._video(part)
                return preprocess_videos([frames], fps=b.video_fps, video_fps=[fps], min_pixels=b.video_min_pixels,
                                         max_pixels=b.video_max_pixels)

            features = self._cached(self._path(part["video"]), "video", video_features)
            example.videos.append(features)
            soundtrack = self._waveform(part["audio"]) if part.get("audio") is not None else None
            if soundtrack is not None:
                example.audios.append(soundtrack)
                example.audio_in_video = True
            return self._video_tokens(features.video_grid_thw[0], float(features.video_second_per_grid[0]),
                                      soundtrack)
        raise UserError(f"message {index}: unknown content part {part!r} (text, audio, image or video)")

    # ------------------------------------------------------------------------------------------------ collate

    def collate(self, examples: Sequence[OmniExample], pad_id: int, left_pad: bool = False) -> dict[str, Any]:
        """A padded batch: ``input_ids``, ``attention_mask``, ``loss_mask`` and the Thinker's media arguments."""
        width = max(len(e.ids) for e in examples)

        def pad(row: list[int], value: int) -> list[int]:
            fill = [value] * (width - len(row))
            return fill + row if left_pad else row + fill

        batch: dict[str, Any] = {
            "input_ids": torch.tensor([pad(e.ids, pad_id) for e in examples]),
            "attention_mask": torch.tensor([pad([1] * len(e.ids), 0) for e in examples]),
            "loss_mask": torch.tensor([pad(e.mask, 0) for e in examples]),
            "use_audio_in_video": any(e.audio_in_video for e in examples),
        }
        audios = [a for e in examples for a in e.audios]
        if audios:
            batch["input_features"], batch["feature_attention_mask"] = audio_features(audios, trim=True)
        images = [i for e in examples for i in e.images]
        if images:
            batch["pixel_values"] = torch.cat([i.pixel_values for i in images])
            batch["image_grid_thw"] = torch.cat([i.image_grid_thw for i in images])
        videos = [v for e in examples for v in e.videos]
        if videos:
            batch["pixel_values_videos"] = torch.cat([v.pixel_values_videos for v in videos])
            batch["video_grid_thw"] = torch.cat([v.video_grid_thw for v in videos])
            batch["video_second_per_grid"] = torch.cat([v.video_second_per_grid for v in videos])
        return batch
