"""The vision side of the Thinker against transformers: image and video preprocessing equal to Qwen2.5-Omni's
processor, and the vision encoder equal to ``Qwen2_5OmniVisionEncoder`` with the same weights (both ways)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from omnilm.omni.config import VisionEncoderConfig
from omnilm.omni.vision import (
    CLIP_STD,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VisionEncoder,
    load_frames,
    merged_token_counts,
    preprocess_images,
    preprocess_videos,
    sample_frame_indices,
    smart_resize,
    window_layout,
)

TOL = dict(atol=1e-4, rtol=0)
# transformers' video processor (and so its Qwen2.5-Omni processor) needs torchvision, which the CPU setup may lack.
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="transformers' video processor needs torchvision")


def noise(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def hf_image_processor():  # noqa: ANN201
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil()


# ------------------------------------------------------------------------------------------------------- images


def test_the_reference_is_the_image_processor_qwen2_5_omni_uses_without_torchvision():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    assert IMAGE_PROCESSOR_MAPPING_NAMES["qwen2_5_omni"]["pil"] == "Qwen2VLImageProcessorPil"
    processor = hf_image_processor()
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (14, 2, 2)
    assert dict(processor.size) == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}


# (height, width): slight up- and down-scaling, below the pixel floor, above the ceiling, already a multiple of 28,
# a thin strip, a portrait.
SIZES = [(50, 70), (20, 30), (1200, 900), (56, 112), (30, 400), (333, 211)]


def test_images_equal_transformers_processor():
    images = [Image.fromarray(noise(h, w, seed=i)) for i, (h, w) in enumerate(SIZES)]
    ours = preprocess_images(images)
    expected = hf_image_processor()(images, return_tensors="pt")
    assert ours.image_grid_thw.dtype == torch.long and ours.pixel_values.dtype == torch.float32
    assert torch.equal(ours.image_grid_thw, expected["image_grid_thw"])
    assert ours.pixel_values.shape == expected["pixel_values"].shape
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values"], **TOL)
    # The grids are those of smart_resize, and a still image spans one temporal patch.
    for (h, w), (t, gh, gw) in zip(SIZES, ours.image_grid_thw.tolist(), strict=True):
        assert t == 1 and (gh * 14, gw * 14) == smart_resize(h, w)


def test_grey_transparent_and_array_images_are_converted_like_transformers():
    grey = Image.fromarray(noise(61, 47, seed=1, channels=1), mode="L")
    rgba = Image.fromarray(noise(45, 90, seed=2, channels=4), mode="RGBA")
    palette = Image.fromarray(noise(40, 40, seed=3)).convert("P")
    palette.info["transparency"] = 7
    smooth = np.stack(np.meshgrid(np.linspace(0, 255, 77), np.linspace(0, 255, 59)) * 2, axis=-1)[..., :3]
    array = smooth.astype(np.uint8)  # (59, 77, 3)
    images = [grey, rgba, palette, array, noise(100, 30, seed=4)]
    ours = preprocess_images(images)
    expected = hf_image_processor()(images, return_tensors="pt")
    assert torch.equal(ours.image_grid_thw, expected["image_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, expected["pixel_values"], **TOL)
    # Transparency matters: the RGBA image composited over white is not its RGB channels.
    opaque = preprocess_images([rgba.convert("RGB")]).pixel_values
    rows = slice(int(ours.image_grid_thw[:1].prod()), int(ours.image_grid_thw[:2].prod(-1).sum()))
    assert (opaque - ours.pixel_values[rows]).abs().max() > 0.1


def test_one_image_and_bad_inputs():
    image = noise(84, 56)
    assert torch.equal(preprocess_images(image).pixel_values, preprocess_images([image]).pixel_values)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images([image.astype(np.float32)])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        preprocess_images([noise(20, 20, channels=4)])
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_images([noise(2, 500)])
    with pytest.raises(ValueError, match="no images"):
        preprocess_images([])


def test_token_counts_follow_the_grid():
    grid = torch.tensor([[1, 4, 6], [3, 8, 10]])
    assert merged_token_counts(grid).tolist() == [6, 60]


# ------------------------------------------------------------------------------------------------------- videos


def test_sample_frame_indices():
    # 3 s at 10 fps sampled at 2 fps: 6 evenly spaced frames.
    assert sample_frame_indices(30, 10.0, 2.0) == [0, 5, 10, 15, 20, 25]
    # Never fewer than 4 frames when the clip has them...
    assert sample_frame_indices(25, 25.0, 2.0) == [0, 6, 12, 18]
    # ...never more than the clip, rounded down to whole temporal patches...
    assert sample_frame_indices(5, 1.0, 30.0) == [0, 1, 2, 3]
    # ...nor more than max_frames; a clip shorter than a temporal patch keeps its frames.
    assert len(sample_frame_indices(10_000, 30.0, 2.0, max_frames=64)) == 64
    assert sample_frame_indices(1, 30.0, 2.0) == [0]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 30.0, 2.0)


def test_video_patches_pair_frames_in_time():
    """No resizing at this size, so each frame must equal the image processor's output for it, frame t of a temporal
    patch in slot t; an odd last frame is repeated."""
    frames = [noise(336, 308, seed=i) for i in range(5)]  # 336·308 px is within the video pixel budget
    ours = preprocess_videos(frames, fps=4.0)
    assert ours.video_grid_thw.tolist() == [[3, 24, 22]]
    assert ours.video_second_per_grid.tolist() == [0.5] and ours.video_second_per_grid.dtype == torch.float32
    images = hf_image_processor()(frames, return_tensors="pt")["pixel_values"]
    per_image = 24 * 22
    video = ours.pixel_values_videos.view(3, per_image, 3, 2, 14 * 14)  # (t, patches, C, T, p·p)
    stills = images.view(5, per_image, 3, 2, 14 * 14)
    for f in range(6):
        source = min(f, 4)
        torch.testing.assert_close(video[f // 2, :, :, f % 2], stills[source, :, :, 0], **TOL)


def test_video_inputs_sampling_and_folders(tmp_path):
    clip = np.stack([noise(60, 80, seed=i) for i in range(12)])  # (T, H, W, 3)
    for i, frame in enumerate(clip):
        Image.fromarray(frame).save(tmp_path / f"{i:04d}.png")
    assert all(np.array_equal(a, b) for a, b in zip(load_frames(tmp_path), clip, strict=True))
    from_folder = preprocess_videos(tmp_path, fps=2.0, video_fps=4.0)
    from_array = preprocess_videos(clip, fps=2.0, video_fps=4.0)
    from_frames = preprocess_videos([list(clip)], fps=2.0, video_fps=[4.0])
    sampled = preprocess_videos(clip[sample_frame_indices(12, 4.0, 2.0)], fps=2.0)
    for other in (from_array, from_frames, sampled):
        assert torch.equal(from_folder.pixel_values_videos, other.pixel_values_videos)
        assert torch.equal(from_folder.video_grid_thw, other.video_grid_thw)
    assert from_folder.video_grid_thw[0, 0] == 3  # 3 s at 2 fps: 6 frames, 3 temporal patches
    # Two videos of different sizes are concatenated.
    both = preprocess_videos([clip, clip[:4, :50]], fps=1.0)
    assert both.video_grid_thw.shape == (2, 3) and both.video_second_per_grid.tolist() == [2.0, 2.0]
    assert both.pixel_values_videos.shape[0] == int(both.video_grid_thw.prod(-1).sum())
    with pytest.raises(FileNotFoundError):
        preprocess_videos(tmp_path / "empty")


def test_video_frames_are_resized_like_images_up_to_rounding():
    """Checkable without torchvision: torch's antialiased bicubic on uint8 (the video path) agrees with PIL's bicubic
    (the image path) to within two grey levels when both sides are scaled the same way. (When one side grows and the
    other shrinks, the two libraries clip between their passes in different orders and can differ far more.)"""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
    two_levels = 2 / 255 / min(CLIP_STD)
    for height, width in [(60, 80), (700, 1000)]:  # scaled up, scaled down
        frame = noise(height, width)
        video = preprocess_videos([frame, frame], fps=2.0)
        expected = images([frame], return_tensors="pt")
        assert torch.equal(video.video_grid_thw, expected["image_grid_thw"])
        torch.testing.assert_close(video.pixel_values_videos, expected["pixel_values"], atol=two_levels, rtol=0)


@needs_torchvision
def test_sampling_agrees_with_transformers():
    """transformers spaces the frames with a float32 arange, which sometimes yields one frame more than the count it
    computed; ours gives exactly that count, and the frames it shares with transformers are the same."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    processor = Qwen2VLVideoProcessor()
    for total in (1, 4, 7, 25, 30, 61, 120, 301, 1000, 3000):
        for video_fps in (1.0, 5.0, 24.0, 29.97):
            for fps in (0.5, 1.0, 2.0, 3.0):
                ours = sample_frame_indices(total, video_fps, fps)
                if total < 2:
                    continue  # transformers cannot sample fewer frames than one temporal patch
                metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
                theirs = processor.sample_frames(metadata, fps=fps).tolist()
                assert len(ours) % 2 == 0 and ours == theirs[:len(ours)] and len(theirs) - len(ours) in (0, 1)


VIDEO_CASES = [  # (frames, height, width, recorded fps or None)
    (9, 60, 80, None),  # odd frame count, scaled up to the video pixel floor
    (8, 700, 1000, None),  # scaled down to the ceiling
    (30, 300, 200, 10.0),  # sampled from 10 to 2 fps
    (5, 336, 308, None),  # no resizing
]


@needs_torchvision
@pytest.mark.parametrize("frames, height, width, video_fps", VIDEO_CASES)
def test_videos_equal_transformers_processor(frames, height, width, video_fps):
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    clip = np.stack([noise(height, width, seed=i) for i in range(frames)])
    kwargs: dict = dict(cap_pixels_per_frame=False, return_tensors="pt")
    if video_fps is not None:
        kwargs |= dict(do_sample_frames=True, fps=2.0, video_metadata=[{"fps": video_fps, "total_num_frames": frames}])
    expected = Qwen2VLVideoProcessor()(videos=[clip], **kwargs)
    ours = preprocess_videos(clip, fps=2.0, video_fps=video_fps)
    assert torch.equal(ours.video_grid_thw, expected["video_grid_thw"])
    torch.testing.assert_close(ours.pixel_values_videos, expected["pixel_values_videos"], **TOL)


def tiny_processor():  # noqa: ANN201
    """Qwen2.5-Omni's processor around a character-level tokenizer built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5OmniProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    special = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
               "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
               "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")} | {
        token: 100 + i for i, token in enumerate(special.values())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, extra_special_tokens=special)
    return Qwen2_5OmniProcessor(image_processor=hf_image_processor(), video_processor=Qwen2VLVideoProcessor(),
                                feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer)


@needs_torchvision
def test_qwen2_5_omni_processor_parity():
    """The whole processor: pixels, grids, seconds per temporal patch, and the number of placeholder tokens it
    writes for each image and video."""
    processor = tiny_processor()
    images = [Image.fromarray(noise(50, 70)), Image.fromarray(noise(200, 90, seed=1))]
    video = np.stack([noise(60, 80, seed=i) for i in range(7)])
    text = "look <|vision_bos|><|IMAGE|><|vision_eos|> and <|vision_bos|><|IMAGE|><|vision_eos|>" \
           " then <|vision_bos|><|VIDEO|><|vision_eos|>"
    expected = processor(text=text, images=images, videos=[video], return_tensors="pt",
                         videos_kwargs=dict(fps=3.0, cap_pixels_per_frame=False))
    ours_images = preprocess_images(images)
    ours_video = preprocess_videos(video, fps=3.0)
    assert torch.equal(ours_images.image_grid_thw, expected["image_grid_thw"])
    torch.testing.assert_close(ours_images.pixel_values, expected["pixel_values"], **TOL)
    assert torch.equal(ours_video.video_grid_thw, expected["video_grid_thw"])
    torch.testing.assert_close(ours_video.pixel_values_videos, expected["pixel_values_videos"], **TOL)
    torch.testing.assert_close(ours_video.video_second_per_grid, expected["video_second_per_grid"].float())
    ids = expected["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == int(merged_token_counts(ours_images.image_grid_thw).sum())
    assert int((ids == processor.video_token_id).sum()) == int(merged_token_counts(ours_video.video_grid_thw).sum())


# ------------------------------------------------------------------------------------------------------- encoder

CONFIG = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=112)
# Patch grids: merged 8×8 (windows of 4×4 divide it), 3×5 (they do not), and a two-temporal-patch video 4×10.
IMAGE_GRIDS = [[1, 16, 16], [1, 6, 10]]
VIDEO_GRIDS = [[2, 8, 20]]


def hf_encoder(attn: str, seed: int = 0):  # noqa: ANN201
    from transformers import Qwen2_5OmniVisionEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

    config = Qwen2_5OmniVisionEncoderConfig(**CONFIG, fullatt_block_indexes=[1])
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return Qwen2_5OmniVisionEncoder(config).eval()


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1, biases non-zero), so that each one shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            norm = name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name
            values = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * values if norm else 0.05 * values)


def encode_hf(model: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels, grid_thw=grid).pooler_output


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("source", ["transformers", "omnilm"])
def test_encoder_equals_transformers_with_the_same_weights(attn, source):
    theirs = hf_encoder(attn)
    ours = VisionEncoder(VisionEncoderConfig(**CONFIG, fullatt_block_indexes=(1,))).eval()
    if source == "transformers":
        randomize(theirs, seed=1)
        ours.load_state_dict(theirs.state_dict(), strict=True)
    else:
        randomize(ours, seed=2)
        theirs.load_state_dict(ours.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(3)
    for grids in (IMAGE_GRIDS, VIDEO_GRIDS, IMAGE_GRIDS + VIDEO_GRIDS):
        grid = torch.tensor(grids)
        pixels = torch.randn(int(grid.prod(-1).sum()), 1176, generator=generator)
        with torch.no_grad():
            out = ours(pixels, grid)
        expected = encode_hf(theirs, pixels, grid)
        assert out.shape == (int(merged_token_counts(grid).sum()), 64)
        assert expected.abs().mean() > 0.05  # the comparison is not between near-zero outputs
        torch.testing.assert_close(out, expected, **TOL)


def test_encoder_on_preprocessed_images_and_video():
    theirs = hf_encoder("sdpa")
    randomize(theirs, seed=4)
    ours = VisionEncoder(VisionEncoderConfig(**CONFIG, fullatt_block_indexes=(1,))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = preprocess_images([noise(120, 200), noise(60, 60, seed=1)])
    video = preprocess_videos([noise(90, 130, seed=i) for i in range(3)], min_pixels=56 * 56)
    for pixels, grid in (images, video[:2]):
        with torch.no_grad():
            torch.testing.assert_close(ours(pixels, grid), encode_hf(theirs, pixels, grid), **TOL)


def test_windows_change_the_output_and_attention_stays_within_an_image():
    model = VisionEncoder(VisionEncoderConfig(**CONFIG, fullatt_block_indexes=(1,))).eval()
    randomize(model, seed=5)
    grid = torch.tensor(IMAGE_GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176)
    first = int(grid[0].prod())
    # The same weights with full attention in every layer: windows no longer separate, so the result differs.
    unwindowed = VisionEncoder(VisionEncoderConfig(**CONFIG, fullatt_block_indexes=(0, 1, 2))).eval()
    unwindowed.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        together = model(pixels, grid)
        alone = model(pixels[:first], grid[:1])
        global_attention = unwindowed(pixels, grid)
    torch.testing.assert_close(together[:alone.shape[0]], alone, atol=1e-5, rtol=0)
    assert (global_attention - together).abs().max() > 1e-2


def test_window_layout():
    # One frame of 6×10 patches = 3×5 merged tokens, windows of 2×2 merged tokens: 2 rows × 3 columns of windows.
    order, windows, frames = window_layout(torch.tensor([[1, 6, 10]]), merge_size=2, window_units=2)
    assert order.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert windows == [16, 16, 8, 8, 8, 4] and frames == [60]
    # Frames of a video and items of a batch follow one another.
    order, windows, frames = window_layout(torch.tensor([[2, 4, 4], [1, 2, 2]]), merge_size=2, window_units=4)
    assert order.tolist() == list(range(9)) and windows == [16, 16, 4] and frames == [16, 16, 4]


def test_bfloat16_follows_transformers():
    theirs = hf_encoder("sdpa")
    randomize(theirs, seed=6)
    ours = VisionEncoder(VisionEncoderConfig(**CONFIG, fullatt_block_indexes=(1,))).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs, ours = theirs.to(torch.bfloat16), ours.to(torch.bfloat16)
    grid = torch.tensor(IMAGE_GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176)  # float32 in: cast to the model's dtype
    with torch.no_grad():
        out = ours(pixels, grid)
    expected = encode_hf(theirs, pixels, grid)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
