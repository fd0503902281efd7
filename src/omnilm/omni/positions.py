"""TMRoPE: the Thinker's 3-D position ids (temporal, height, width) for text, audio, images and video.

Written for this project after the Qwen2.5-Omni report; the same ids as transformers' ``get_rope_index``.
A sequence is read left to right; ``next`` is one past the largest id given so far:

- a text token (markers like ``<|audio_bos|>`` included) gets (next, next, next);
- an audio block gets one id per token, all three equal (a token is 40 ms: 25 ids per second of sound);
- an image or video block of ``t × h × w`` merged tokens gets ``next + (time, row, column)``: the row and column
  in the merged grid, the time ``⌊t_index · seconds_per_grid · 25⌋`` (0 for a still image);
- audio inside a video (``use_audio_in_video``): the two openers ``<|vision_bos|><|audio_bos|>`` share one id,
  then video and audio tokens alternate in 2-second chunks (50 ids of time), each keeping its own ids, and the
  two closers share the next id.

Padding positions get 1. Without any image or video in the batch the ids are plain 1-D (audio ids are 1-D
anyway). ``deltas`` (B, 1) = largest id + 1 − number of tokens: decoding continues at ``length + delta``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from omnilm.omni.audio import audio_token_lengths
from omnilm.omni.config import ThinkerConfig


@dataclass
class _Media:
    """Per-kind queues of what the placeholders stand for, consumed in order across the whole batch."""

    image_grids: list[list[int]]
    video_grids: list[list[int]]
    video_seconds: list[float]
    audio_tokens: list[int]
    image: int = 0
    video: int = 0
    audio: int = 0


def _vision_ids(start: int, grid: list[int], merge: int, seconds_per_grid: float, ids_per_second: int,
                ) -> torch.Tensor:
    """(3, t·h·w/merge²) ids of one image or video: time, row and column of every merged token, plus ``start``."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    time = (torch.arange(t) * seconds_per_grid * ids_per_second).long()  # the float product, truncated like HF
    rows = torch.arange(h).view(1, -1, 1).expand(t, h, w)  # (t, h, w)
    cols = torch.arange(w).view(1, 1, -1).expand(t, h, w)
    return torch.stack([time.view(-1, 1, 1).expand(t, h, w), rows, cols]).flatten(1) + start


def _chunks(values: torch.Tensor, start: int, per_chunk: int) -> list[tuple[int, int]]:
    """Index ranges cutting the non-decreasing ``values`` at the chunk boundaries ``start + k · per_chunk``.

    The boundary count advances by one per position that crosses one (as transformers does), so a jump over
    several boundaries at once only closes one chunk there.
    """
    cuts, begin, k = [], 0, 1
    for i, value in enumerate(values.tolist()):
        if value - start >= k * per_chunk:
            cuts.append((begin, i))
            begin, k = i, k + 1
    return cuts + [(begin, len(values))]


def _row_ids(tokens: list[int], config: ThinkerConfig, media: _Media, use_audio_in_video: bool) -> torch.Tensor:
    """(3, len(tokens)) ids of one unpadded sequence."""
    merge = config.vision.spatial_merge_size
    per_second = config.position_id_per_seconds
    pieces: list[torch.Tensor] = []
    next_id = 0

    def add(ids: torch.Tensor) -> None:
        nonlocal next_id
        pieces.append(ids)
        next_id = int(ids.max()) + 1

    def text(count: int) -> torch.Tensor:
        return torch.arange(next_id, next_id + count).view(1, -1).expand(3, -1)

    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == config.image_token_id:
            grid = media.image_grids[media.image]
            media.image += 1
            add(_vision_ids(next_id, grid, merge, 1.0, per_second))
            i += grid[0] * grid[1] * grid[2] // merge**2
        elif token == config.audio_token_id:
            count = media.audio_tokens[media.audio]
            media.audio += 1
            add(text(count))
            i += count
        elif token == config.video_token_id and not use_audio_in_video:
            grid, seconds = media.video_grids[media.video], media.video_seconds[media.video]
            media.video += 1
            add(_vision_ids(next_id, grid, merge, seconds, per_second))
            i += grid[0] * grid[1] * grid[2] // merge**2
        elif (use_audio_in_video and token == config.vision_start_token_id and i + 1 < len(tokens)
              and tokens[i + 1] == config.audio_start_token_id):
            add(text(1).repeat(1, 2))  # the two openers share one id
            grid, seconds = media.video_grids[media.video], media.video_seconds[media.video]
            count = media.audio_tokens[media.audio]
            media.video, media.audio = media.video + 1, media.audio + 1
            start = next_id
            video = _vision_ids(start, grid, merge, seconds, per_second)
            audio = torch.arange(start, start + count).view(1, -1).expand(3, -1)
            per_chunk = per_second * config.seconds_per_chunk
            video_cuts, audio_cuts = _chunks(video[0], start, per_chunk), _chunks(audio[0], start, per_chunk)
            for j in range(max(len(video_cuts), len(audio_cuts))):
                for ids, cuts in ((video, video_cuts), (audio, audio_cuts)):
                    if j < len(cuts):
                        pieces.append(ids[:, cuts[j][0]:cuts[j][1]])
            next_id = int(pieces[-1].max()) + 1  # one past the last chunk placed, as transformers counts
            add(text(1).repeat(1, 2))  # the two closers share one id
            i += 2 + video.shape[1] + count + 2
        else:
            add(text(1))
            i += 1
    ids = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    if ids.shape[1] != len(tokens):
        raise ValueError(f"the media placeholders do not match the media: {ids.shape[1]} positions for "
                         f"{len(tokens)} tokens")
    return ids


def rope_index(input_ids: torch.Tensor, config: ThinkerConfig, attention_mask: torch.Tensor | None = None,
               image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
               audio_feature_lengths: torch.Tensor | None = None, video_second_per_grid: torch.Tensor | None = None,
               use_audio_in_video: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D position ids (3, B, T) and decoding deltas (B, 1) for a batch (padding marked 0 in ``attention_mask``).

    ``audio_feature_lengths`` are the mel-frame counts of the audios in order of appearance (the token counts
    follow from them), grids are in patches (t, h, w) as the encoders take them, ``video_second_per_grid`` is the
    seconds one temporal patch of each video spans.
    """
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if image_grid_thw is None and video_grid_thw is None:
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        positions = positions[None].expand(3, -1, -1)
        deltas = positions.amax(dim=(0, 2)).view(-1, 1) + 1 - mask.sum(-1, keepdim=True)
        return positions, deltas
    media = _Media(image_grids=_rows(image_grid_thw), video_grids=_rows(video_grid_thw),
                   video_seconds=[] if video_second_per_grid is None else [float(s) for s in video_second_per_grid],
                   audio_tokens=[] if audio_feature_lengths is None
                   else audio_token_lengths(audio_feature_lengths).tolist())
    positions = torch.ones(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    for row, (tokens, real) in enumerate(zip(input_ids.cpu(), mask.cpu(), strict=True)):
        ids = _row_ids(tokens[real].tolist(), config, media, use_audio_in_video)
        positions[:, row, real] = ids
        deltas[row, 0] = (int(ids.max()) + 1 if ids.numel() else 0) - int(real.sum())
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def _rows(grids: torch.Tensor | None) -> list[list[int]]:
    return [] if grids is None else [list(map(int, g)) for g in grids]


def decode_positions(deltas: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """(3, B, count) ids of ``count`` text tokens generated after ``start`` cached positions."""
    steps = torch.arange(start, start + count, device=deltas.device).view(1, -1) + deltas  # (B, count)
    return steps[None].expand(3, -1, -1)


def iter_placeholders(tokens: list[int], token_id: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every run of ``token_id`` in ``tokens``."""
    i = 0
    while i < len(tokens):
        if tokens[i] == token_id:
            j = i
            while j < len(tokens) and tokens[j] == token_id:
                j += 1
            yield i, j
            i = j
        else:
            i += 1
