"""Random multimodal sequence layouts for the omni tests: text, audio, images, videos (optionally with their audio
track interleaved), as the Qwen2.5-Omni processor lays them out, batched with left padding."""

from __future__ import annotations

from hypothesis import strategies as st

PAD = 0


def audio_tokens(frames: int) -> int:
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


@st.composite
def layouts(draw: st.DrawFn, max_rows: int = 3) -> dict:
    use_audio_in_video = draw(st.booleans())
    rows = []
    for _ in range(draw(st.integers(1, max_rows))):
        segments = []
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["text", "audio", "image", "video"]))
            if kind == "text":
                segments.append(("text", draw(st.lists(st.integers(5, 280), min_size=1, max_size=5))))
            elif kind == "audio":
                segments.append(("audio", draw(st.integers(3, 900))))
            elif kind == "image":
                segments.append(("image", [1, 2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 3))]))
            else:
                grid = [draw(st.integers(1, 4)), 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2))]
                seconds = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0]))
                frames = draw(st.integers(3, 700)) if use_audio_in_video else 0
                segments.append(("video", (grid, seconds, frames)))
        segments.append(("text", draw(st.lists(st.integers(5, 280), min_size=1, max_size=4))))
        rows.append(segments)
    return {"rows": rows, "use_audio_in_video": use_audio_in_video}


def build_batch(layout: dict, config) -> dict:  # noqa: ANN001
    """input_ids (left-padded), attention_mask and the media tensors for ``layout``."""
    import torch

    from omnilm.omni.positions import _chunks, _vision_ids

    c = config
    merge = c.vision.spatial_merge_size
    per_chunk = c.position_id_per_seconds * c.seconds_per_chunk
    rows, images, videos, seconds, audios = [], [], [], [], []
    for segments in layout["rows"]:
        tokens: list[int] = []
        for kind, value in segments:
            if kind == "text":
                tokens += value
            elif kind == "audio":
                audios.append(value)
                tokens += [c.audio_start_token_id] + [c.audio_token_id] * audio_tokens(value) + [c.audio_end_token_id]
            elif kind == "image":
                images.append(value)
                n = value[0] * value[1] * value[2] // merge**2
                tokens += [c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id]
            else:
                grid, secs, frames = value
                videos.append(grid)
                seconds.append(secs)
                n = grid[0] * grid[1] * grid[2] // merge**2
                if not layout["use_audio_in_video"]:
                    tokens += [c.vision_start_token_id] + [c.video_token_id] * n + [c.vision_end_token_id]
                    continue
                audios.append(frames)
                count = audio_tokens(frames)
                video_ids = _vision_ids(0, grid, merge, secs, c.position_id_per_seconds)
                video_cuts = _chunks(video_ids[0], 0, per_chunk)
                audio_cuts = _chunks(torch.arange(count), 0, per_chunk)
                tokens += [c.vision_start_token_id, c.audio_start_token_id]
                for j in range(max(len(video_cuts), len(audio_cuts))):
                    if j < len(video_cuts):
                        tokens += [c.video_token_id] * (video_cuts[j][1] - video_cuts[j][0])
                    if j < len(audio_cuts):
                        tokens += [c.audio_token_id] * (audio_cuts[j][1] - audio_cuts[j][0])
                tokens += [c.audio_end_token_id, c.vision_end_token_id]
        rows.append(tokens)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask,
            "image_grid_thw": torch.tensor(images) if images else None,
            "video_grid_thw": torch.tensor(videos) if videos else None,
            "video_second_per_grid": torch.tensor(seconds) if videos else None,
            "audio_feature_lengths": torch.tensor(audios) if audios else None}
