"""Learning-rate schedules: linear warmup, then cosine, linear, warmup-stable-decay (WSD) or constant."""

from __future__ import annotations

import math

from omnilm.train.config import TrainConfig


def lr_multiplier(step: int, total_steps: int, config: TrainConfig) -> float:
    """Factor on the peak learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = config.min_lr_ratio
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "wsd":
        decay_steps = max(1, round(config.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
    if config.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
