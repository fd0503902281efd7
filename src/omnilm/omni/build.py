"""A Thinker made from a text model: the decoder gains the media markers and multimodal RoPE, the encoders start fresh.

The conversion changes nothing the decoder computes on text: a Llama-family model becomes Qwen2-family with zero
q/k/v biases (the Thinker's layout), multimodal RoPE with three equal position components is plain RoPE, and the
new token rows (the markers) start at the mean of the existing embeddings. ``mrope_section`` splits the rotary
frequencies as Qwen2.5-Omni does (a quarter temporal, the rest shared by height and width) unless told otherwise.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from omnilm.model.hf import load_pretrained
from omnilm.model.transformer import Transformer
from omnilm.omni.config import AudioEncoderConfig, ThinkerConfig, VisionEncoderConfig
from omnilm.omni.processor import OMNI_TOKENS
from omnilm.omni.thinker import Thinker
from omnilm.tokenizer import Tokenizer


def mrope_sections(head_dim: int) -> tuple[int, int, int]:
    """Temporal/height/width split of ``head_dim / 2`` rotary frequencies (16/24/24 for head_dim 128)."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return temporal, height, half - temporal - height


def thinker_from_decoder(folder: str | Path, audio: dict[str, Any] | None = None,
                         vision: dict[str, Any] | None = None, seed: int = 0,
                         mrope_section: tuple[int, ...] | list[int] | None = None) -> tuple[Thinker, Tokenizer]:
    """A Thinker whose decoder is the model in ``folder`` (llama or qwen2 family) and whose encoders are new
    (``audio`` / ``vision``: AudioEncoderConfig / VisionEncoderConfig fields; output widths follow the decoder);
    and the folder's tokenizer with the media markers added. ``mrope_section``: the temporal/height/width split of
    the rotary frequencies (default :func:`mrope_sections`)."""
    tokenizer = Tokenizer.from_dir(folder)
    decoder = load_pretrained(folder, dtype=torch.float32)
    if decoder.config.family == "gpt2":
        raise ValueError(f"{folder}: a GPT-2-family model has no rotary positions to extend into TMRoPE")
    ids = dict(zip(OMNI_TOKENS, tokenizer.add_special_tokens(list(OMNI_TOKENS.values())), strict=True))
    text = replace(decoder.config, family="qwen2", vocab_size=max(tokenizer.vocab_size, decoder.config.vocab_size),
                   mrope_section=tuple(mrope_section or mrope_sections(decoder.config.dim_per_head)))
    width = text.d_model
    config = ThinkerConfig(text=text, audio=AudioEncoderConfig(**(audio or {}) | {"output_dim": width}),
                           vision=VisionEncoderConfig(**(vision or {}) | {"out_hidden_size": width}), **ids)
    torch.manual_seed(seed)
    thinker = Thinker(config)
    thinker.decoder.load_state_dict(_grown_state(decoder, thinker.decoder), strict=True)
    return thinker, tokenizer


def _grown_state(source: Transformer, target: Transformer) -> dict[str, torch.Tensor]:
    """``source``'s weights in ``target``'s shapes: zero biases where it has none, new vocabulary rows at the mean
    row (a neutral start for tokens it never saw)."""
    state = dict(source.state_dict())
    out = {}
    for name, empty in target.state_dict().items():
        if name not in state:  # q/k/v biases of the Qwen2 layout
            out[name] = torch.zeros_like(empty)
            continue
        tensor = state[name]
        if tensor.shape != empty.shape:  # embedding / head rows for the new tokens
            grown = tensor.mean(0, keepdim=True).expand(empty.shape[0], -1).clone()
            grown[: tensor.shape[0]] = tensor
            tensor = grown
        out[name] = tensor
    return out
