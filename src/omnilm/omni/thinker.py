"""The Thinker: omnilm's decoder reading text, audio, images and video (Qwen2.5-Omni's layout), and its checkpoints.

Written for this project: composition, not a new decoder. The audio and vision encoders turn media into vectors of
the decoder's width; those vectors replace the embeddings of the placeholder tokens (``<|AUDIO|>``, ``<|IMAGE|>``,
``<|VIDEO|>``, one placeholder per encoder output, in order); the decoder then runs on these embeddings with 3-D
TMRoPE positions (:mod:`omnilm.omni.positions`). ``forward`` takes transformers'
``Qwen2_5OmniThinkerForConditionalGeneration`` keyword arguments and returns logits (B, T, vocab).

Checkpoints: a thinker folder is transformers' layout (``config.json`` of model_type ``qwen2_5_omni_thinker``;
tensors ``audio_tower.*``, ``visual.*``, ``model.*`` and ``lm_head.weight``), so :func:`load_thinker` reads what
transformers writes and :func:`save_thinker` writes what it reads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.model.attention import KVCache
from omnilm.model.hf import (
    check_tensors,
    read_config_json,
    read_hf_tensors,
    state_from_hf,
    state_to_hf,
    write_weights,
)
from omnilm.model.transformer import Transformer
from omnilm.omni.audio import AudioEncoder
from omnilm.omni.config import MediaBudget, ThinkerConfig, thinker_config_from_hf, thinker_config_to_hf
from omnilm.omni.positions import rope_index
from omnilm.omni.vision import VisionEncoder
from omnilm.utils.atomic import write_json_atomic

TOWERS = ("audio_tower", "visual")
BUDGET_FILE = "media_budget.json"


class Thinker(nn.Module):
    """Audio encoder + vision encoder + decoder; see the module docstring."""

    def __init__(self, config: ThinkerConfig, media_budget: MediaBudget | None = None) -> None:
        super().__init__()
        self.config = config
        #: How media are sized for this model (saved with it; None = Qwen2.5-Omni's processor defaults).
        self.media_budget = media_budget
        self.audio_tower = AudioEncoder(config.audio)
        self.visual = VisionEncoder(config.vision)
        self.decoder = Transformer(config.text)

    def embed(self, input_ids: torch.Tensor, input_features: torch.Tensor | None = None,
              feature_attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
              image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
              video_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, d) with the placeholders replaced by the encoders' outputs."""
        x = self.decoder.tok_emb(input_ids)
        dtype = x.dtype
        if input_features is not None:
            if feature_attention_mask is None:
                feature_attention_mask = torch.ones(input_features.shape[0], input_features.shape[2],
                                                    dtype=torch.long, device=input_features.device)
            lengths = feature_attention_mask.sum(-1)
            # (B, mel, frames) -> (mel, Σ real frames): the encoder takes every audio packed end to end.
            packed = input_features.transpose(1, 2)[feature_attention_mask.bool()].transpose(0, 1)
            x = self._place(x, input_ids, self.config.audio_token_id, self.audio_tower(packed, lengths), "audio")
        if pixel_values is not None:
            features = self.visual(pixel_values.to(dtype), image_grid_thw)
            x = self._place(x, input_ids, self.config.image_token_id, features, "image")
        if pixel_values_videos is not None:
            features = self.visual(pixel_values_videos.to(dtype), video_grid_thw)
            x = self._place(x, input_ids, self.config.video_token_id, features, "video")
        return x

    @staticmethod
    def _place(x: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor,
               kind: str) -> torch.Tensor:
        """``x`` with the rows of ``token_id`` placeholders replaced, in order, by ``features`` (N, d)."""
        where = input_ids == token_id  # (B, T)
        count = int(where.sum())
        if count != features.shape[0]:
            raise ValueError(f"{count} {kind} placeholder token(s) for {features.shape[0]} {kind} vectors")
        return x.masked_scatter(where[..., None], features.to(x.dtype))

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     feature_attention_mask: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None, video_second_per_grid: torch.Tensor | None = None,
                     use_audio_in_video: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """TMRoPE ids (3, B, T) and decoding deltas (B, 1) for these inputs."""
        lengths = None if feature_attention_mask is None else feature_attention_mask.sum(-1)
        return rope_index(input_ids, self.config, attention_mask, image_grid_thw, video_grid_thw, lengths,
                          video_second_per_grid, use_audio_in_video)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                      pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                      video_second_per_grid: torch.Tensor | None = None, use_audio_in_video: bool = False,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The decoder's final hidden states (B, T, d) over text and media."""
        embeds = self.embed(input_ids, input_features, feature_attention_mask, pixel_values, image_grid_thw,
                            pixel_values_videos, video_grid_thw)
        if position_ids is None:
            position_ids, _ = self.position_ids(input_ids, attention_mask, feature_attention_mask, image_grid_thw,
                                                video_grid_thw, video_second_per_grid, use_audio_in_video)
        return self.decoder.hidden_states(None, attention_mask, position_ids, cache, inputs_embeds=embeds)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                video_second_per_grid: torch.Tensor | None = None, use_audio_in_video: bool = False,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); the keyword arguments are those of transformers' thinker. ``logits_at`` (B, T)
        bool: only the logits of those positions, (N, vocab) in row-major order (training scores a few reply
        tokens among hundreds of media placeholders, and the head over every position is most of its cost)."""
        h = self.hidden_states(input_ids, attention_mask, input_features, feature_attention_mask, pixel_values,
                               image_grid_thw, pixel_values_videos, video_grid_thw, video_second_per_grid,
                               use_audio_in_video, position_ids, cache)
        if logits_at is not None:
            return self.decoder.lm_head(h[logits_at])
        return self.decoder.lm_head(h[:, -1:] if last_only else h)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per text position, as the trainer's MFU counts them: 6·(non-embedding parameters) plus
        the decoder's attention scores (the encoders' work per media token is counted in with their weights)."""
        params = sum(p.numel() for name, p in self.named_parameters() if "tok_emb" not in name)
        text = self.config.text
        return 6.0 * params + 12.0 * text.n_layer * text.n_head * text.dim_per_head * seq_len

    # Checkpoints of the trainer: the thinker writes and reads its own folder layout.
    def save_pretrained(self, folder: str | Path, tokenizer: Any = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        return save_thinker(self, folder, tokenizer, state)

    @staticmethod
    def read_state(folder: str | Path) -> dict[str, torch.Tensor]:
        """The tensors of a thinker folder under this module's parameter names."""
        return _thinker_state(folder, read_thinker_config(folder))


# ---------------------------------------------------------------------------------------------
# checkpoints


def thinker_state_to_hf(thinker: Thinker, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The thinker's tensors (or ``state``, with this module's names) under transformers' names."""
    state = {k: v.detach() for k, v in (thinker.state_dict() if state is None else state).items()}
    out = {k: v.contiguous() for k, v in state.items() if k.split(".", 1)[0] in TOWERS}
    decoder = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    return out | state_to_hf(thinker.decoder, decoder)


def save_thinker(thinker: Thinker, folder: str | Path, tokenizer: Any = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``thinker`` as a transformers thinker folder (config.json, safetensors, tokenizer if given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = thinker_state_to_hf(thinker, state)
    write_weights(folder, tensors)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json_atomic(folder / "config.json", thinker_config_to_hf(thinker.config) | {"dtype": dtype})
    if thinker.media_budget is not None:
        write_json_atomic(folder / BUDGET_FILE, asdict(thinker.media_budget))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


THINKER_MODEL_TYPES = ("qwen2_5_omni_thinker", "qwen2_5_omni")  # a thinker alone, or a whole Qwen2.5-Omni


def is_thinker_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a Thinker (its config.json's model_type is a Qwen2.5-Omni thinker's or a whole
    Qwen2.5-Omni's, whose thinker is read)."""
    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") in THINKER_MODEL_TYPES


def read_media_budget(folder: str | Path) -> MediaBudget | None:
    """The media budget saved with a Thinker (None: Qwen2.5-Omni's processor defaults), without loading weights."""
    path = Path(folder) / BUDGET_FILE
    return MediaBudget(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def read_thinker_config(folder: str | Path) -> ThinkerConfig:
    hf, source = read_config_json(folder)
    return thinker_config_from_hf(hf, source=source)


def _thinker_state(folder: str | Path, config: ThinkerConfig) -> dict[str, torch.Tensor]:
    """A thinker folder's tensors renamed to the Thinker's parameter names (stored buffers dropped)."""
    towers, decoder = {}, {}
    for name, tensor in read_hf_tensors(folder).items():
        if name.startswith(("talker.", "token2wav.")):  # a whole Qwen2.5-Omni: its speech half is not the thinker
            continue
        name = name.removeprefix("thinker.")
        if name.split(".", 1)[0] in TOWERS:
            if not name.endswith("positional_embedding.positional_embedding"):  # a table transformers may store
                towers[name] = tensor
        else:
            decoder[name] = tensor
    return towers | {f"decoder.{k}": v for k, v in state_from_hf(decoder, config.text).items()}


def load_thinker(folder: str | Path, dtype: torch.dtype | None = None,
                 mrope_section: tuple[int, ...] | list[int] | None = None) -> Thinker:
    """A Thinker from a thinker folder (omnilm's or transformers'); every tensor is checked by name and shape.
    ``mrope_section``: a new temporal/height/width split of the decoder's rotary frequencies (no weight depends on
    it: the same model reads positions otherwise, and is trained to)."""
    config = read_thinker_config(folder)
    if mrope_section:
        config = replace(config, text=replace(config.text, mrope_section=tuple(mrope_section)))
    with torch.device("meta"):
        thinker = Thinker(config, read_media_budget(folder))
    state = _thinker_state(folder, config)
    expected = {k: v.shape for k, v in thinker.state_dict().items()}
    if config.text.tie_embeddings:
        state.pop("decoder.lm_head.weight", None)
        expected.pop("decoder.lm_head.weight")
    check_tensors(folder, state, expected)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    thinker.load_state_dict(state, strict=False, assign=True)
    if config.text.tie_embeddings:
        thinker.decoder.lm_head.weight = thinker.decoder.tok_emb.weight
    thinker.audio_tower.reset_buffers()  # its position table was built on the meta device
    return thinker.eval()
