"""The multimodal Thinker (Qwen2.5-Omni layout): audio and vision encoders, TMRoPE positions, the decoder that
reads them, and checkpoint interop with transformers.

``from omnilm.omni import load_thinker`` reads a thinker folder (omnilm's own, or one written by transformers'
``Qwen2_5OmniThinkerForConditionalGeneration.save_pretrained``); ``save_thinker`` writes one. They are imported on
first use, so that the command line, which imports this package for its ``omni`` commands, does not load torch.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"Thinker": "omnilm.omni.thinker", "load_thinker": "omnilm.omni.thinker", "save_thinker": "omnilm.omni.thinker",
         "ThinkerConfig": "omnilm.omni.config"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'omnilm.omni' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
