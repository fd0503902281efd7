"""Training checkpoints: model (HF layout) + optimizer + trainer state + RNG, written atomically.

A checkpoint is a folder ``step-NNNNNNN/`` holding a loadable model folder (``config.json``,
``model.safetensors``, tokenizer files), ``optimizer.safetensors`` (optimizer moments and RNG states) and
``trainer_state.json`` (step, data-loader position, optimizer hyperparameters). It is assembled in a
temporary folder that is renamed into place, so a crash never leaves a half-written checkpoint behind.
No pickle anywhere: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from omnilm.model.hf import read_config, read_hf_tensors, save_pretrained, state_from_hf
from omnilm.train.distributed import Dist, barrier, unwrap
from omnilm.utils.atomic import write_json_atomic

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "optimizer.safetensors"
PREFIX = "step-"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (parameter-name keyed) into tensors and JSON-able scalars."""
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            name, field = key[len("state/"):].rsplit("/", 1)
            state.setdefault(name, {})[field] = value
    for name, values in meta["scalars"].items():
        state.setdefault(name, {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_model(model: nn.Module, folder: Path, tokenizer: Any, state: dict[str, torch.Tensor]) -> None:
    # A model with its own folder layout (e.g. omnilm.model.reward.RewardModel) writes and reads it itself.
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, tokenizer=tokenizer, state=state)
    else:
        save_pretrained(model, folder, tokenizer=tokenizer, state=state)


def _read_model_state(model: nn.Module, folder: str | Path) -> dict[str, torch.Tensor]:
    if hasattr(model, "read_state"):
        return model.read_state(folder)
    return state_from_hf(read_hf_tensors(folder), read_config(folder))


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], info: Dist, tokenizer: Any = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` (collective: every process must call it) and prune old ones."""
    if hasattr(model, "gather_state"):  # a pipeline stage holds some layers: the first rank merges them all
        model_state, optim_state = model.gather_state(optimizer)
    else:
        model_state = get_model_state_dict(model, options=FULL)
        optim_state = get_optimizer_state_dict(model, optimizer, options=FULL)
    root = Path(root)
    final = root / checkpoint_name(step)
    if info.is_main:
        tmp = root / (final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _save_model(unwrap(model), tmp, tokenizer, model_state)
        tensors, meta = _flatten_optimizer(optim_state)
        save_file(tensors | _rng_tensors(), str(tmp / TENSORS_FILE))
        write_json_atomic(tmp / STATE_FILE, trainer_state | {"step": step, "optimizer": meta})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def restore_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights, optimizer moments and RNG states of checkpoint ``path`` into an already-built (and
    possibly wrapped or sharded) model and its optimizer; returns the trainer state."""
    state = load_trainer_state(path)
    weights = _read_model_state(unwrap(model), path)
    tensors = load_file(str(Path(path) / TENSORS_FILE))
    optim_state = _unflatten_optimizer(tensors, state.pop("optimizer"))
    if hasattr(model, "own_state"):  # a pipeline stage takes its own layers' slice
        weights, optim_state = model.own_state(weights, optim_state)
    incompatible = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    problems = [k for k in incompatible.missing_keys if k != "lm_head.weight"] + list(incompatible.unexpected_keys)
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the model: {problems[:10]}")
    # Not strict: a parameter that had received no gradient yet (an encoder whose media no batch held so far) has
    # no optimizer state in the checkpoint. Loading creates state for every parameter, and state such a parameter
    # should not have changes its first real update (a resumed run drifted from the uninterrupted one): it is
    # dropped again, so such a parameter has none after the restore either, exactly as before.
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state,
                             options=StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False))
    for name, param in unwrap(model).named_parameters():
        if name not in optim_state["state"]:
            optimizer.state.pop(param, None)
    _restore_rng(tensors)
    return state
