"""The Thinker's eyes: image and video preprocessing, and the vision encoder of Qwen2.5-Omni.

Preprocessing turns pictures into rows of flattened patches. A picture is resized so that both sides are multiples
of 28 (one merged token = 2×2 patches of 14×14 pixels) and its area lies within a pixel budget, scaled to [0, 1],
normalised with the CLIP mean/std, and cut into 14×14 patches that span two frames in time (a still image is its own
second frame). Each patch is one row of 3·2·14·14 = 1176 values laid out (channel, frame, row, column), and the rows
of a frame come 2×2 merge block by merge block, so that the four patches that become one language-model token are
consecutive. ``grid_thw`` gives each picture's patch grid (frames/2, rows, columns).

The encoder is a ViT over those patches: a linear patch embedding, blocks of pre-norm attention (2-D rotary
positions over the patch grid) and a SwiGLU MLP, then a merger that concatenates each 2×2 block and projects it to the
language model's width. Attention never crosses a frame; most blocks attend only within windows of 4×4 merged tokens
(``window_size`` pixels), a few (``fullatt_block_indexes``) over the whole frame. Module and parameter names are those
of transformers' ``Qwen2_5OmniVisionEncoder``, so its state dict loads as it is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from omnilm.model.attention import apply_rope
from omnilm.model.transformer import RMSNorm
from omnilm.omni.config import VisionEncoderConfig

# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing

#: OpenAI CLIP's per-channel statistics, which the encoder was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
#: Pixel budgets of transformers' Qwen2-VL image and video processors (the defaults Qwen2.5-Omni's processor uses).
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
#: Bounds on the number of frames sampled from a video.
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768

ImageLike = Image.Image | np.ndarray
#: A video: its frames, a (T, H, W, 3) uint8 array, or a folder of PNG frames.
VideoLike = Sequence[ImageLike] | np.ndarray | str | Path


class ImageFeatures(NamedTuple):
    """Preprocessed images, concatenated."""

    #: (Σ t·h·w, 1176) float32 patches, image after image.
    pixel_values: torch.Tensor
    #: (n_images, 3) int64 patch grid (t, h, w) of each image; t is 1.
    image_grid_thw: torch.Tensor


class VideoFeatures(NamedTuple):
    """Preprocessed videos, concatenated."""

    #: (Σ t·h·w, 1176) float32 patches, video after video.
    pixel_values_videos: torch.Tensor
    #: (n_videos, 3) int64 patch grid (t, h, w) of each video; t counts pairs of frames.
    video_grid_thw: torch.Tensor
    #: (n_videos,) float32 seconds covered by one temporal patch (temporal_patch_size / fps).
    video_second_per_grid: torch.Tensor


def smart_resize(height: int, width: int, factor: int = PATCH_SIZE * MERGE_SIZE, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """The (height, width) a picture is resized to: multiples of ``factor``, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as those allow."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of a {height}x{width} picture "
                         "is over 200")
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:
        # Shrink both sides by the same factor, rounding down so the area stays under the budget.
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


def to_rgb(image: ImageLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image (any mode; transparency is composited over white) or of an (H, W) grey or
    (H, W, 3) RGB uint8 array."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or "transparency" in image.info:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image arrays must be (H, W) or (H, W, 3), got {array.shape}; pass other layouts as PIL")
    return array


def _normalize(frames: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) uint8 → float32 scaled to [0, 1] and standardised per channel."""
    x = frames.to(torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def patchify(frames: torch.Tensor, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut (F, C, H, W) frames into rows of (C·T·p·p) patch values and give the grid (t, h, w).

    H and W must be multiples of patch_size·merge_size. F is padded to a multiple of temporal_patch_size by
    repeating the last frame. Rows run over time, then merge blocks in raster order, then the patches inside a block.
    """
    n_frames, channels, height, width = frames.shape
    if pad := -n_frames % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, h, w = frames.shape[0] // temporal_patch_size, height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    x = frames.reshape(t, temporal_patch_size, channels, h // m, m, p, w // m, m, p)
    # (t, T, C, bh, ih, ph, bw, iw, pw) → (t, bh, bw, ih, iw, C, T, ph, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(t * h * w, channels * temporal_patch_size * p * p)  # (t·h·w, C·T·p·p)
    return patches, (t, h, w)


def _check_budget(min_pixels: int, max_pixels: int) -> None:
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")


def preprocess_images(images: ImageLike | Sequence[ImageLike], min_pixels: int = IMAGE_MIN_PIXELS,
                      max_pixels: int = IMAGE_MAX_PIXELS) -> ImageFeatures:
    """Patches and grids of ``images`` (PIL images or (H, W, 3) uint8 arrays), as Qwen2.5-Omni's processor makes them.

    Each image is resized with PIL's bicubic filter (what transformers' PIL image processor uses) to the
    :func:`smart_resize` size, normalised, and repeated to fill a temporal patch. An image of grid (1, h, w) becomes
    h·w/4 tokens of the language model.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    if not images:
        raise ValueError("no images")
    _check_budget(min_pixels, max_pixels)
    rows, grids = [], []
    for image in images:
        rgb = to_rgb(image)
        height, width = smart_resize(rgb.shape[0], rgb.shape[1], min_pixels=min_pixels, max_pixels=max_pixels)
        if (height, width) != rgb.shape[:2]:
            rgb = np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC))
        frame = _normalize(torch.tensor(rgb).permute(2, 0, 1)[None])  # (1, 3, H, W)
        patches, grid = patchify(frame)  # the single frame is padded to a temporal patch by repetition
        rows.append(patches)
        grids.append(grid)
    return ImageFeatures(torch.cat(rows), torch.tensor(grids, dtype=torch.long))


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = 2.0,
                         temporal_patch_size: int = TEMPORAL_PATCH_SIZE, min_frames: int = VIDEO_MIN_FRAMES,
                         max_frames: int = VIDEO_MAX_FRAMES) -> list[int]:
    """Indices of the frames kept when a clip of ``total_frames`` recorded at ``video_fps`` is sampled at ``fps``.

    The count follows transformers' Qwen2-VL video processor: duration·fps, at least ``min_frames`` and at most
    ``max_frames`` or the clip's length, rounded down to whole temporal patches; the frames are evenly spaced from
    the first. A clip shorter than one temporal patch keeps all its frames.
    """
    if total_frames < 1 or video_fps <= 0 or fps <= 0:
        raise ValueError(f"cannot sample {total_frames} frames at {video_fps} fps down to {fps} fps")
    cap = min(max_frames, total_frames) // temporal_patch_size * temporal_patch_size
    wanted = min(max(total_frames / video_fps * fps, min_frames), cap)
    count = math.floor(wanted / temporal_patch_size) * temporal_patch_size
    if count == 0:
        return list(range(total_frames))
    # Exact integer spacing: index i is floor(i·total/count).
    return [i * total_frames // count for i in range(count)]


def load_frames(folder: str | Path) -> list[np.ndarray]:
    """The PNG frames of ``folder`` in file-name order (so name them with zero-padded numbers), as RGB arrays."""
    paths = sorted(Path(folder).glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no .png frames in {folder}")
    frames = []
    for path in paths:
        with Image.open(path) as image:
            frames.append(to_rgb(image))
    return frames


def _video_frames(video: VideoLike) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video given as frames, an array or a folder of PNGs."""
    if isinstance(video, (str, Path)):
        video = load_frames(video)
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3:
            raise ValueError(f"video arrays must be (T, H, W, 3) uint8, got {video.shape} {video.dtype}")
        return video
    frames = [to_rgb(frame) for frame in video]
    if not frames:
        raise ValueError("a video needs at least one frame")
    if len({frame.shape for frame in frames}) > 1:
        raise ValueError("all frames of a video must have the same size")
    return np.stack(frames)


def _is_one_video(videos: object) -> bool:
    """Whether ``videos`` is a single video (a folder, a 4-D array or a list of frames) rather than a list of them."""
    if isinstance(videos, (str, Path, np.ndarray)):
        return True
    first = videos[0] if isinstance(videos, Sequence) and len(videos) else None
    return isinstance(first, Image.Image) or (isinstance(first, np.ndarray) and first.ndim in (2, 3))


def preprocess_videos(videos: VideoLike | Sequence[VideoLike], fps: float = 2.0,
                      video_fps: float | Sequence[float | None] | None = None, min_pixels: int = VIDEO_MIN_PIXELS,
                      max_pixels: int = VIDEO_MAX_PIXELS) -> VideoFeatures:
    """Patches, grids and seconds per temporal patch of ``videos``, as Qwen2.5-Omni's processor makes them.

    ``video_fps`` is the rate each video was recorded at: its frames are then sampled down to ``fps`` with
    :func:`sample_frame_indices`. Without it the frames are taken as already sampled at ``fps``. Frames are resized
    with torch's antialiased bicubic filter on uint8 (what transformers' video processor runs on CPU) to the
    :func:`smart_resize` size of the video budget, and consecutive pairs of frames form the temporal patches (an odd
    last frame is repeated). ``video_second_per_grid`` is temporal_patch_size / fps, as transformers' processor
    computes it: the requested rate, not the rate the sampling achieved.
    """
    if _is_one_video(videos):
        videos = [videos]
    if not videos:
        raise ValueError("no videos")
    _check_budget(min_pixels, max_pixels)
    rates = list(video_fps) if isinstance(video_fps, Sequence) else [video_fps] * len(videos)
    if len(rates) != len(videos):
        raise ValueError(f"{len(rates)} video_fps for {len(videos)} videos")
    rows, grids = [], []
    for video, rate in zip(videos, rates, strict=True):
        frames = _video_frames(video)
        if rate is not None:
            frames = frames[sample_frame_indices(len(frames), rate, fps)]
        height, width = smart_resize(frames.shape[1], frames.shape[2], min_pixels=min_pixels, max_pixels=max_pixels)
        x = torch.tensor(frames).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8
        if (height, width) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        patches, grid = patchify(_normalize(x))
        rows.append(patches)
        grids.append(grid)
    seconds = torch.full((len(videos),), TEMPORAL_PATCH_SIZE / fps, dtype=torch.float32)
    return VideoFeatures(torch.cat(rows), torch.tensor(grids, dtype=torch.long), seconds)


def merged_token_counts(grid_thw: torch.Tensor, merge_size: int = MERGE_SIZE) -> torch.Tensor:
    """(n,) number of language-model tokens of each image or video: t·h·w / merge_size²."""
    return grid_thw.prod(dim=-1) // merge_size**2


# ----------------------------------------------------------------------------------------------------------------------
# Encoder

#: Base of the vision rotary frequencies (Qwen2.5-Omni's vision_config.rope_parameters.rope_theta).
VISION_ROPE_THETA = 10000.0


def vision_rope(grid_thw: torch.Tensor, head_dim: int, merge_size: int = MERGE_SIZE,
                theta: float = VISION_ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables (N, head_dim) for the patches of ``grid_thw``, in the order of the pixel rows.

    2-D rotary positions: a quarter of the head's frequencies turn with the patch's row, the next quarter with its
    column, and the second half of the head mirrors the first ("rotate half" layout). Every frame of a video starts
    again at (0, 0): time enters only the language model's positions.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2))
    positions = []
    m = merge_size
    for t, h, w in grid_thw.tolist():
        # Rows come merge block by merge block: (block row, block column, row in block, column in block).
        rows = torch.arange(h).view(h // m, 1, m, 1).expand(h // m, w // m, m, m).flatten()
        cols = torch.arange(w).view(1, w // m, 1, m).expand(h // m, w // m, m, m).flatten()
        positions.append(torch.stack([rows, cols], dim=1).repeat(t, 1))  # (t·h·w, 2)
    angles = torch.cat(positions).float()[:, :, None] * inv_freq  # (N, 2, head_dim/4)
    angles = angles.flatten(1)  # (N, head_dim/2): row frequencies, then column frequencies
    angles = torch.cat([angles, angles], dim=1)  # (N, head_dim)
    device = grid_thw.device
    return angles.cos().to(device), angles.sin().to(device)


def window_layout(grid_thw: torch.Tensor, merge_size: int, window_units: int) -> tuple[torch.Tensor, list[int],
                                                                                       list[int]]:
    """How the encoder regroups tokens so that every attention segment is contiguous.

    Returns ``order`` (U,): the merged tokens (2×2 patch groups, U of them) listed window by window, each window's
    tokens in raster order, windows in raster order within a frame, frames and items in order; ``window_lengths``:
    the patches in each window, in that order; ``frame_lengths``: the patches of each frame. Windows are
    ``window_units`` × ``window_units`` merged tokens from the frame's top-left corner; those on the bottom and right
    edges are cut short when the grid does not divide evenly.
    """
    orders, window_lengths, frame_lengths = [], [], []
    offset = 0
    for t, h, w in grid_thw.tolist():
        mh, mw = h // merge_size, w // merge_size  # merged-token grid of one frame
        nwh, nww = -(-mh // window_units), -(-mw // window_units)  # windows per column and per row
        frame = torch.arange(t).view(t, 1, 1)
        window_row = (torch.arange(mh) // window_units).view(1, mh, 1)
        window_col = (torch.arange(mw) // window_units).view(1, 1, mw)
        window = ((frame * nwh + window_row) * nww + window_col).flatten()  # (t·mh·mw,) window of each token
        # A stable sort by window keeps the raster order inside each window.
        orders.append(torch.argsort(window, stable=True) + offset)
        window_lengths += (torch.bincount(window, minlength=t * nwh * nww) * merge_size**2).tolist()
        frame_lengths += [h * w] * t
        offset += t * mh * mw
    return torch.cat(orders), window_lengths, frame_lengths


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Attention confined to consecutive segments: q, k, v (heads, N, head_dim) with segments of ``lengths`` laid end
    to end; returns (heads, N, head_dim). Runs of equal-length segments go through one batched call."""
    outputs, start = [], 0
    for length, run in itertools.groupby(lengths):
        count = sum(1 for _ in run)
        end = start + count * length
        # (heads, count·length, d) → (count, heads, length, d): one batch entry per segment
        qs, ks, vs = (x[:, start:end].unflatten(1, (count, length)).transpose(0, 1) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs)  # (count, heads, length, d)
        outputs.append(out.transpose(0, 1).flatten(1, 2))  # (heads, count·length, d)
        start = end
    if start != q.shape[1]:
        raise ValueError(f"segments cover {start} tokens, the sequence has {q.shape[1]}")
    return torch.cat(outputs, dim=1)


class PatchEmbed(nn.Module):
    """Linear embedding of a 2×14×14×3 patch, kept as the Conv3d of the checkpoints (kernel = stride = patch)."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C·T·p·p) → (N, hidden_size)."""
        # The convolution sees exactly one window per patch, so it is a matrix product with the flattened kernel.
        weight = self.proj.weight.flatten(1)  # (hidden, C·T·p·p), same (C, T, p, p) order as a pixel row
        return F.linear(pixel_values.to(weight.dtype), weight)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with 2-D rotary positions, confined to segments (windows or frames)."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads or (config.hidden_size // config.num_heads) % 4:
            raise ValueError(f"hidden_size {config.hidden_size} must split into {config.num_heads} heads of a size "
                             "divisible by 4 (rows and columns each take half of the rotated pairs)")
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.hidden_size, config.hidden_size)
        self.k = nn.Linear(config.hidden_size, config.hidden_size)
        self.v = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: Sequence[int]) -> torch.Tensor:
        """x (N, hidden) with segments of ``lengths`` laid end to end; rope: cos/sin (N, head_dim)."""
        n, dim = x.shape
        q, k, v = (proj(x).view(n, self.num_heads, -1) for proj in (self.q, self.k, self.v))  # (N, heads, hd)
        cos, sin = (table[:, None, :] for table in rope)  # (N, 1, hd)
        # Rotations in fp32, as the checkpoints were trained, whatever the model's dtype.
        q = apply_rope(q.float(), cos, sin).to(x.dtype)
        k = apply_rope(k.float(), cos, sin).to(x.dtype)
        out = segment_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), lengths)  # (heads, N, hd)
        return self.proj(out.transpose(0, 1).reshape(n, dim))


class VisionMLP(nn.Module):
    """SwiGLU feed-forward with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """Pre-norm attention then pre-norm MLP, each added to the residual stream."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: Sequence[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2×2 block of patches → one token of the language model's width: norm, concatenate, GELU MLP."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.merged_size = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(self.merged_size, self.merged_size), nn.GELU(),
                                 nn.Linear(self.merged_size, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, hidden) with each block's patches consecutive → (N/merge², out_hidden_size)."""
        return self.mlp(self.ln_q(x).view(-1, self.merged_size))  # (N/merge², hidden·merge²) → (…, out)


class VisionEncoder(nn.Module):
    """Qwen2.5-Omni's vision encoder: ``forward(pixel_values, grid_thw)`` → (Σ t·h·w/4, out_hidden_size)."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.window_units = config.window_size // config.spatial_merge_size // config.patch_size
        if self.window_units < 1:
            raise ValueError(f"window_size {config.window_size} is smaller than one merged token "
                             f"({config.spatial_merge_size * config.patch_size} pixels)")
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C·T·p·p) as :func:`preprocess_images`/:func:`preprocess_videos` make them, grid_thw
        (n, 3) → merged tokens (N/merge², out_hidden_size) in the order of the pixel rows' merge blocks, in the
        model's dtype."""
        m2 = self.config.spatial_merge_size**2
        n = pixel_values.shape[0]
        if n != int(grid_thw.prod(dim=-1).sum()):
            raise ValueError(f"{n} patch rows for grids totalling {int(grid_thw.prod(dim=-1).sum())} patches")
        order, window_lengths, frame_lengths = window_layout(grid_thw, self.config.spatial_merge_size,
                                                             self.window_units)
        order = order.to(pixel_values.device)
        x = self.patch_embed(pixel_values)  # (N, hidden)
        cos, sin = vision_rope(grid_thw, x.shape[1] // self.config.num_heads, self.config.spatial_merge_size)

        def by_window(t: torch.Tensor) -> torch.Tensor:
            # Move whole merge blocks, so a block's patches stay consecutive: (N, d) → (N/m², m², d) → (N, d)
            return t.view(n // m2, m2, -1)[order].view(n, -1)

        x, rope = by_window(x), (by_window(cos.to(x.device)), by_window(sin.to(x.device)))
        for i, block in enumerate(self.blocks):
            # Windows never straddle frames, so frames are contiguous in window order too.
            lengths = frame_lengths if i in self.config.fullatt_block_indexes else window_lengths
            x = block(x, rope, lengths)
        merged = self.merger(x)  # (N/m², out) in window order
        out = torch.empty_like(merged)
        out[order] = merged  # back to the order of the pixel rows
        return out
