"""A tiny random Thinker folder (decoder, audio and vision encoders, tokenizer with the media markers), and the
reference reply computed in the test process with ``generate_thinker``, shared by the omni CLI and serving tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnilm.infer.detokenize import StreamingDecoder
from omnilm.infer.generate import FINISHED
from omnilm.infer.sampling import SamplingParams
from omnilm.model.config import ModelConfig
from omnilm.omni.audio import write_wav
from omnilm.omni.config import AudioEncoderConfig, MediaBudget, ThinkerConfig, VisionEncoderConfig
from omnilm.omni.generate import generate_thinker
from omnilm.omni.processor import OMNI_TOKENS, OmniProcessor
from omnilm.omni.thinker import Thinker, save_thinker
from omnilm.tokenizer import Tokenizer
from omnilm.tokenizer.chat import IM_END

#: Small media budgets keep prompts short: an image is at most 16 placeholders, a video frame pair 4.
BUDGET = MediaBudget(image_min_pixels=56 * 56, image_max_pixels=112 * 112, video_min_pixels=56 * 56,
                     video_max_pixels=56 * 56, video_fps=2.0)


def tiny_thinker_folder(folder: Path, tokenizer: Tokenizer, max_seq_len: int = 512, seed: int = 0) -> Path:
    """Write a 2-layer random Thinker with ``tokenizer`` (a copy of it gains the media markers) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder)
    own = Tokenizer.from_dir(folder)  # a copy: the session's tokenizer fixture stays as it is
    ids = dict(zip(OMNI_TOKENS, own.add_special_tokens(list(OMNI_TOKENS.values())), strict=True))
    text = ModelConfig(family="qwen2", vocab_size=own.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       max_seq_len=max_seq_len, mrope_section=(2, 3, 3), qkv_bias=True, tie_embeddings=False,
                       eos_token_id=own.eos_id)
    config = ThinkerConfig(
        text=text,
        audio=AudioEncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                                 output_dim=64),
        vision=VisionEncoderConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
        **ids)
    torch.manual_seed(seed)
    thinker = Thinker(config, BUDGET)
    # Every parameter random (default inits leave biases at 0, which hide mistakes), norm scales around 1 (around 0
    # they would squash what the media add): greedy replies then differ with every image or sound.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in thinker.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            if name.endswith("weight") and param.dim() == 1:  # layer / RMS norm scales
                param.add_(1.0)
    return save_thinker(thinker, folder, own)


def reference_reply(thinker: Thinker, tokenizer: Tokenizer, messages: list[dict[str, Any]],
                    params: SamplingParams) -> tuple[str, int, int]:
    """(reply text, prompt tokens, reply tokens) of ``generate_thinker`` for ``messages`` (processor parts),
    stopping at the end of the turn as a chat reply does."""
    processor = OmniProcessor(tokenizer, thinker.config, thinker.media_budget)
    example = processor.encode(messages, add_generation_prompt=True)
    batch = processor.collate([example], pad_id=0, left_pad=True)
    eos = {i for i in (tokenizer.eos_id, thinker.config.text.eos_token_id, tokenizer.token_to_id(IM_END))
           if i is not None}
    decoder, count = StreamingDecoder(tokenizer, params.stop), 0
    text = ""
    for step in generate_thinker(thinker, batch, params, sorted(eos), 0):
        token = int(step[0])
        if token == FINISHED or token in eos:
            break
        count += 1
        text += decoder.push(token)
        if decoder.stopped:
            break
    return text + decoder.finish(), len(example.ids), count


def noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 noise: any change of pixels changes the vision encoder's output."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def tone(seconds: float, hz: float = 440.0, rate: int = 16_000, amplitude: float = 0.5) -> torch.Tensor:
    """A sine of ``hz`` at ``rate`` samples per second."""
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * torch.pi * hz * t)).float()


def tone_wav(path: Path, seconds: float, hz: float = 440.0, rate: int = 16_000) -> Path:
    write_wav(path, tone(seconds, hz, rate), rate)
    return path
