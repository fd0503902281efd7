"""Changing a trained model's context settings without touching its weights: the start of context extension.

Position interpolation, NTK-aware base scaling and YaRN only change how positions become rotations, so a model
trained at one length is extended by giving it a new ``rope_scaling`` / ``rope_theta`` / ``max_seq_len`` (and
then, for most methods, a short fine-tune at the new length).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from omnilm.config import ConfigError
from omnilm.model.transformer import Transformer

#: The ModelConfig fields a trained model may change: none of them changes a weight's shape.
CONTEXT_FIELDS = ("max_seq_len", "rope_theta", "rope_scaling", "sliding_window", "window_from_layer")


def with_context(model: Transformer, overrides: dict[str, Any], share: bool = False) -> Transformer:
    """``model`` under new context settings (``CONTEXT_FIELDS``). With ``share`` a shallow copy sharing the
    weights is returned (for evaluating one model several ways); otherwise the model itself is changed."""
    unknown = sorted(set(overrides) - set(CONTEXT_FIELDS))
    if unknown:
        raise ConfigError(f"a trained model can change only its context settings {list(CONTEXT_FIELDS)}, "
                          f"not {unknown}")
    length = overrides.get("max_seq_len", model.config.max_seq_len)
    if model.pos_emb is not None and length > model.pos_emb.num_embeddings:
        raise ConfigError("a learned-position model cannot grow its context (its position table is fixed)")
    target = copy.copy(model) if share else model
    target.config = replace(model.config, **overrides)
    return target
