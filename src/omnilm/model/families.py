"""The encoder and encoder–decoder families: presets, fresh models, and loading a folder by its model_type.

The decoder families (gpt2, llama, qwen2, …) keep their own path (``model.hf.load_pretrained``); ``load_any``
dispatches a folder to whichever loader its config.json's ``model_type`` names, so callers (stages,
``omnilm generate``) need not know the family.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.config import ConfigError

ENCODER_TYPES = ("bert", "electra")
SEQ2SEQ_TYPES = ("t5", "bart")


def family_presets() -> dict[str, dict[str, Any]]:
    """Family -> {preset name: config} for the encoder and encoder–decoder families."""
    from omnilm.model import bart, encoder, t5

    encoders = {name: c for name, c in encoder.PRESETS.items()}
    return {"bert": {k: v for k, v in encoders.items() if v.family == "bert"},
            "electra": {k: v for k, v in encoders.items() if v.family == "electra"},
            "t5": dict(t5.PRESETS), "bart": dict(bart.PRESETS)}


def model_type(folder: str | Path) -> str | None:
    from omnilm.model.hf import read_config_json

    hf, _ = read_config_json(folder)
    return hf.get("model_type")


def is_seq2seq(model: nn.Module) -> bool:
    """An encoder–decoder (it has ``encode``/``decode``)."""
    return hasattr(model, "encode") and hasattr(model, "decode")


def load_any(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             **encoder_options: Any) -> nn.Module:
    """Load a model folder of any supported family (``encoder_options``: ``load_encoder``'s head/overrides)."""
    kind = model_type(folder)
    if kind in ENCODER_TYPES:
        from omnilm.model.hf_encoder import load_encoder

        return load_encoder(folder, dtype=dtype, device=device, **encoder_options)
    if kind == "t5":
        from omnilm.model.hf_t5 import load_t5

        return load_t5(folder, dtype, device)
    if kind == "bart":
        from omnilm.model.hf_bart import load_bart

        return load_bart(folder, dtype, device)
    from omnilm.model.hf import load_pretrained

    return load_pretrained(folder, dtype=dtype, device=device)


def fresh_model(spec: dict[str, Any], head: str | None = None, **fields: Any) -> nn.Module:
    """A randomly initialised model from ``spec`` (``family:`` bert/electra/t5/bart, an optional ``preset:`` of it
    and field overrides); ``fields`` (vocab size, special ids from the tokenizer) override both. ``head`` picks the
    encoder's task head (mlm / classify / rtd)."""
    spec = dict(spec)
    family = spec.pop("family", None)
    if family is None and "preset" in spec:
        family = next((f for f, presets in family_presets().items() if spec["preset"] in presets), None)
    if family in ENCODER_TYPES:
        from omnilm.model.encoder import load_encoder_config
        from omnilm.model.hf_encoder import HEADS

        config = replace(load_encoder_config(spec | ({} if "preset" in spec else {"family": family})), **fields)
        if config.family != family:
            raise ConfigError(f"preset {spec.get('preset')!r} is a {config.family} model, not {family}")
        return HEADS[head or "mlm"][0](config)
    if family == "t5":
        from omnilm.model.t5 import T5, load_t5_config

        return T5(replace(load_t5_config(spec), **fields))
    if family == "bart":
        from omnilm.model.bart import Bart, load_bart_config

        return Bart(replace(load_bart_config(spec), **fields))
    raise ConfigError(f"model family {family!r} is not an encoder or encoder-decoder family "
                      f"({', '.join(ENCODER_TYPES + SEQ2SEQ_TYPES)})")
