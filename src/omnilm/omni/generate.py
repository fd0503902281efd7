"""Generation with the Thinker: prefill text and media once, then decode text tokens with a KV cache.

The prompt's TMRoPE positions come from :func:`omnilm.omni.positions.rope_index`; every generated token is text,
so its three position components are equal and continue one past the largest id of its row (the row's "delta"
in transformers' terms), whatever padding precedes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from omnilm.infer.generate import decode_loop
from omnilm.infer.sampling import SamplingParams
from omnilm.omni.processor import media_arguments
from omnilm.omni.thinker import Thinker


@torch.inference_mode()
def generate_thinker(thinker: Thinker, batch: dict[str, Any], params: SamplingParams, eos_ids: Sequence[int] = (),
                     pad_id: int = 0) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) of a left-padded ``batch`` (``OmniProcessor.collate(...,
    left_pad=True)``); ended rows yield FINISHED."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    media = media_arguments(batch)
    rows, width = ids.shape
    positions, _ = thinker.position_ids(ids, mask, media.get("feature_attention_mask"), media.get("image_grid_thw"),
                                        media.get("video_grid_thw"), media.get("video_second_per_grid"),
                                        bool(media.get("use_audio_in_video", False)))
    next_position = positions.amax(dim=(0, 2)) + 1  # (B,): text continues past every id given so far
    cache = thinker.decoder.new_cache(rows, width + params.max_new_tokens)
    logits = thinker(ids, mask, position_ids=positions, cache=cache, last_only=True, **media)[:, -1]

    def step(feed: torch.Tensor) -> torch.Tensor:
        nonlocal mask, next_position
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        position = next_position.view(1, -1, 1).expand(3, -1, 1)  # (3, B, 1)
        next_position = next_position + 1
        return thinker.decoder(feed[:, None], mask, position, cache=cache)[:, -1]

    yield from decode_loop(logits, step, params, eos_ids, pad_id)
