"""LoRA inside a training stage (``lora:`` in any stage config): only the adapters train.

Every model folder the stage writes (checkpoints and ``final/``) holds the **merged** model in the plain Hugging
Face layout, so later stages, evaluations and ``transformers`` load it like any other model, plus the adapter
alone in PEFT's format under ``adapter/`` (load it with ``peft.PeftModel.from_pretrained`` on the stage's
starting model) and ``lora.safetensors`` (the adapter tensors under omnilm's names). Resuming reads only the
adapter back: the frozen base weights are the stage's starting model, rebuilt exactly as at the start.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnilm.adapters.lora import (
    LoraConfig,
    apply_lora,
    check_exportable,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_report,
)
from omnilm.config import from_dict

LORA_TENSORS = "lora.safetensors"
ADAPTER_FOLDER = "adapter"


class LoraStageModel(nn.Module):
    """A Transformer with LoRA adapters that saves itself as merged model + adapter (see the module docstring)."""

    def __init__(self, model: nn.Module, base_path: str | None) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.blocks = model.blocks  # FLOP estimates and FSDP wrapping look for these
        self.base_path = base_path

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def hidden_states(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.hidden_states(*args, **kwargs)

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None, state: Any = None) -> None:
        from omnilm.model.hf import save_pretrained

        folder = Path(folder)
        save_pretrained(merge_lora(copy.deepcopy(self.model)), folder, tokenizer=tokenizer)
        save_adapter(self.model, folder / ADAPTER_FOLDER, base_model_name_or_path=self.base_path)
        save_file({k: v.detach().contiguous() for k, v in lora_state_dict(self.model).items()},
                  str(folder / LORA_TENSORS))

    def read_state(self, folder: str | Path) -> dict[str, torch.Tensor]:
        """This model's state with the adapter tensors of checkpoint ``folder``."""
        state = self.state_dict()
        state.update({f"model.{name}": tensor for name, tensor in load_file(str(Path(folder) / LORA_TENSORS)).items()})
        return state


def with_lora(model: nn.Module, settings: dict[str, Any], base_path: str | None, seed: int) -> LoraStageModel:
    """``model`` with LoRA adapters from ``settings`` (a :class:`LoraConfig` mapping), everything else frozen.

    Adapters that could not be saved in PEFT's format (GPT-2's fused q/k/v) are refused here, before training.
    """
    config = from_dict(LoraConfig, dict(settings), source="stage lora")
    torch.manual_seed(seed)  # the adapters' initialisation is part of the run's determinism
    apply_lora(model, config)
    check_exportable(model)
    print(f"LoRA: {trainable_report(model)}")
    return LoraStageModel(model, base_path)
