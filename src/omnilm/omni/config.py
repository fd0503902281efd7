"""Configurations of the Thinker and its encoders, nested like transformers' Qwen2.5-Omni sub-configs.

``ThinkerConfig`` holds the decoder (omnilm's :class:`~omnilm.model.config.ModelConfig`, Qwen2 family with
``mrope_section``), the audio encoder and the vision encoder, and the ids of the placeholder and marker tokens.
Field names follow transformers' ``Qwen2_5OmniAudioEncoderConfig`` / ``Qwen2_5OmniVisionEncoderConfig`` /
``Qwen2_5OmniThinkerConfig`` so that ``config.json`` maps over key for key (``thinker_config_to_hf`` and
``thinker_config_from_hf``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from omnilm.config import ConfigError
from omnilm.model.config import ModelConfig


def _known(cls: type, values: dict[str, Any], source: str, ignore: set[str] = frozenset()) -> dict[str, Any]:
    """The entries of a transformers sub-config that ``cls`` has; an unsupported setting is refused by name."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names and k not in ignore}


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Qwen2.5-Omni's audio encoder (a Whisper-style transformer over 2-second chunks of log-mel frames)."""

    #: Mel bins of the input features.
    num_mel_bins: int = 128
    #: Transformer width, depth, heads and feed-forward width.
    d_model: int = 128
    encoder_layers: int = 2
    encoder_attention_heads: int = 4
    encoder_ffn_dim: int = 512
    #: Longest input in positions after the stride-2 convolution (the sinusoid table's size).
    max_source_positions: int = 1500
    #: Half a chunk, in mel frames: chunks are 2·n_window frames (100 frames = 1 s, so 2 s by default).
    n_window: int = 100
    #: Width of the tokens handed to the language model.
    output_dim: int = 128


@dataclass(frozen=True)
class VisionEncoderConfig:
    """Qwen2.5-Omni's vision encoder (a ViT over 14×14×2 patches with 2-D rotary positions and windows)."""

    depth: int = 2
    hidden_size: int = 128
    intermediate_size: int = 256
    num_heads: int = 4
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    #: Side of an attention window in pixels (112 = 8 patches = 4 merged tokens).
    window_size: int = 112
    #: Width of the tokens handed to the language model.
    out_hidden_size: int = 128
    #: Layers attending over the whole image rather than within windows.
    fullatt_block_indexes: tuple[int, ...] = (1,)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))


@dataclass(frozen=True)
class MediaBudget:
    """How media are sampled and sized before the encoders (Qwen2.5-Omni's processor defaults; tiny models trained
    here use smaller budgets, recorded with the model in ``media_budget.json`` so every user sizes media alike)."""

    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    #: Frames per second a video is sampled at.
    video_fps: float = 2.0


@dataclass(frozen=True)
class ThinkerConfig:
    """The Thinker: decoder + audio and vision encoders + the ids of its special tokens."""

    text: ModelConfig = field(default_factory=lambda: ModelConfig(family="qwen2", mrope_section=(4, 6, 6)))
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    #: Placeholders replaced by encoder outputs, one per audio / image / video token.
    audio_token_id: int = 0
    image_token_id: int = 0
    video_token_id: int = 0
    #: Markers around media.
    audio_start_token_id: int = 0
    audio_end_token_id: int = 0
    vision_start_token_id: int = 0
    vision_end_token_id: int = 0
    user_token_id: int = 0
    #: TMRoPE: temporal position ids per second of media, and the audio/video interleaving chunk.
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2

    def __post_init__(self) -> None:
        if self.text.mrope_section is None:
            raise ConfigError("the Thinker's decoder needs mrope_section (its rotary dimension split in 3)")
        if self.text.d_model != self.audio.output_dim or self.text.d_model != self.vision.out_hidden_size:
            raise ConfigError(f"the encoders' output widths (audio {self.audio.output_dim}, vision "
                              f"{self.vision.out_hidden_size}) must equal the decoder's d_model {self.text.d_model}")

    def with_token_ids(self, ids: dict[str, int]) -> ThinkerConfig:
        return replace(self, **ids)


THINKER_TOKEN_FIELDS = ("audio_token_id", "image_token_id", "video_token_id", "audio_start_token_id",
                        "audio_end_token_id", "vision_start_token_id", "vision_end_token_id", "user_token_id")
# transformers spells three of them "..._index" in config.json.
_HF_TOKEN_NAMES = {"audio_token_id": "audio_token_index", "image_token_id": "image_token_index",
                   "video_token_id": "video_token_index"}


def thinker_config_to_hf(config: ThinkerConfig) -> dict[str, Any]:
    """``config.json`` of ``Qwen2_5OmniThinkerForConditionalGeneration`` for ``config``."""
    from omnilm.model.hf import config_to_hf

    text = config_to_hf(config.text)
    text.pop("architectures", None)
    text["model_type"] = "qwen2_5_omni_text"
    audio = asdict(config.audio) | {"model_type": "qwen2_5_omni_audio_encoder", "activation_function": "gelu",
                                    "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0,
                                    "activation_dropout": 0.0}
    vision = {k: v for k, v in asdict(config.vision).items() if k != "norm_eps"}
    vision |= {"model_type": "qwen2_5_omni_vision_encoder", "hidden_act": "silu",
               "fullatt_block_indexes": list(config.vision.fullatt_block_indexes),
               "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}
    out: dict[str, Any] = {"architectures": ["Qwen2_5OmniThinkerForConditionalGeneration"],
                           "model_type": "qwen2_5_omni_thinker", "text_config": text, "audio_config": audio,
                           "vision_config": vision, "position_id_per_seconds": config.position_id_per_seconds,
                           "seconds_per_chunk": config.seconds_per_chunk,
                           "tie_word_embeddings": config.text.tie_embeddings}
    for name in THINKER_TOKEN_FIELDS:
        out[_HF_TOKEN_NAMES.get(name, name)] = getattr(config, name)
    return out


def text_config_from_hf(text_hf: dict[str, Any], source: str) -> ModelConfig:
    """The language model of a Thinker or Talker ``config.json``, as a qwen2 ModelConfig.

    Sliding windows are refused: these models attend through their own 4-D masks (time-interleaved media, left
    padding), which a window configured on the decoder would not reach."""
    from omnilm.model.hf import CheckpointError, config_from_hf

    if text_hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: sliding-window attention is not supported in the omni models")
    return config_from_hf(text_hf, source=source)


def thinker_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ThinkerConfig:
    """A ThinkerConfig from a transformers thinker ``config.json`` (or the ``thinker_config`` of a full one)."""
    if hf.get("model_type") == "qwen2_5_omni":
        hf = hf["thinker_config"]
    if hf.get("model_type") != "qwen2_5_omni_thinker":
        raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} is not a Qwen2.5-Omni thinker")
    text_hf = dict(hf["text_config"]) | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    text_hf["tie_word_embeddings"] = hf.get("tie_word_embeddings", False)
    text = text_config_from_hf(text_hf, source=f"{source}: text_config")
    audio_hf = hf.get("audio_config") or {}
    vision_hf = dict(hf.get("vision_config") or {})
    for key, expected in (("activation_function", "gelu"), ("scale_embedding", False)):
        if audio_hf.get(key, expected) != expected:
            raise ConfigError(f"{source}: audio_config.{key}={audio_hf[key]!r} is not supported (only {expected!r})")
    if vision_hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: vision_config.hidden_act={vision_hf['hidden_act']!r} is not supported")
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(vision_hf.get(key), (list, tuple)):
            vision_hf[key] = vision_hf[key][0]
    tokens = {name: hf[_HF_TOKEN_NAMES.get(name, name)] for name in THINKER_TOKEN_FIELDS
              if _HF_TOKEN_NAMES.get(name, name) in hf}
    return ThinkerConfig(text=text, audio=AudioEncoderConfig(**_known(AudioEncoderConfig, audio_hf, source)),
                         vision=VisionEncoderConfig(**_known(VisionEncoderConfig, vision_hf, source)),
                         position_id_per_seconds=hf.get("position_id_per_seconds", 25),
                         seconds_per_chunk=hf.get("seconds_per_chunk", 2), **tokens)
