"""Reading and writing PEFT adapter folders: ``adapter_config.json`` plus ``adapter_model.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omnilm.config import ConfigError
from omnilm.utils.atomic import atomic_path, write_json_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_adapter_folder(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files atomically; the config goes last so a folder with a config is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    write_json_atomic(folder / ADAPTER_CONFIG, config)
    return folder


def read_adapter_folder(folder: str | Path, peft_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT folder of ``peft_type``; pickle-based weights are refused."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise ConfigError(f"{folder}: missing file {ADAPTER_CONFIG}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type") != peft_type:
        raise ConfigError(f"{config_path}: peft_type {config.get('peft_type')!r}, expected {peft_type!r}")
    if not weights_path.is_file():
        raise ConfigError(f"{folder}: missing file {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    with safe_open(str(weights_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    return config, tensors
