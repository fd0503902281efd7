"""Parameter-efficient fine-tuning: LoRA adapters and soft prompts, in PEFT's folder format."""

from omnilm.adapters.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
    trainable_report,
)
from omnilm.adapters.prompt_tuning import PromptTunedModel, SoftPrompt

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "PromptTunedModel",
    "SoftPrompt",
    "apply_lora",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
    "trainable_parameters",
    "trainable_report",
]
