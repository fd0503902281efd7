"""The decoder-only transformer, its config and presets, and Hugging Face checkpoint interop."""

from omnilm.model.attention import KVCache
from omnilm.model.config import PRESETS, ModelConfig, get_preset, load_model_config
from omnilm.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "PRESETS", "Transformer", "get_preset", "load_model_config"]
