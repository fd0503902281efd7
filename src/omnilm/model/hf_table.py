"""Tensor-name tables for the Hugging Face adapters of the encoder and encoder–decoder families, and the save/load
steps they share.

A family's checkpoint knowledge is one list of ``(omnilm name, Hugging Face name)`` templates, where ``{i}``
stands for a layer index; both directions are derived from that one list. Names of neither side pass through
unchanged, so ``hf.check_tensors`` reports them as unexpected instead of dropping them silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnilm.model.hf import check_tensors, read_hf_tensors, write_weights
from omnilm.utils.atomic import write_json_atomic


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


class KeyTable:
    """Renames tensors between omnilm and Hugging Face with one list of templates."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = list(pairs)
        self._ours = [(_pattern(a), b) for a, b in self.pairs]
        self._theirs = [(_pattern(b), a) for a, b in self.pairs]

    @staticmethod
    def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str:
        for pattern, target in table:
            match = pattern.match(name)
            if match:
                return target.replace("{i}", match.group(1)) if match.groups() else target
        return name

    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._rename(k, self._ours): v.detach().contiguous() for k, v in state.items()}

    def from_hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._rename(k, self._theirs): v for k, v in tensors.items()}


def save_folder(folder: str | Path, tensors: dict[str, torch.Tensor], config_json: dict[str, Any],
                generation: dict[str, Any] | None = None, tokenizer: Any = None) -> Path:
    """Write weights (Hugging Face names), config.json, generation_config.json and the tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(folder, tensors)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json_atomic(folder / "config.json", config_json | {"dtype": dtype})
    write_json_atomic(folder / "generation_config.json",
                      {k: v for k, v in (generation or {}).items() if v is not None})
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_into(folder: str | Path, build: Callable[[], nn.Module], table: KeyTable, aliases: Sequence[str] = (),
              dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
              tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A model built by ``build`` (on the meta device) with the weights of ``folder``.

    ``aliases`` are Hugging Face names of tensors that repeat another one (tied embeddings written out by some
    versions): they are dropped. Tied parameters are filled once and re-tied by the model's ``tie_weights``.
    ``tensors`` are the folder's tensors when the caller has read them already.
    """
    tensors = read_hf_tensors(folder) if tensors is None else tensors
    tensors = {k: v for k, v in tensors.items() if k not in set(aliases)}
    state = table.from_hf(tensors)
    with torch.device("meta"):
        model = build()
    expected = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)  # a tied copy: the first name carries it
            continue
        seen.add(id(param))
        expected[name] = param.shape
    expected |= {k: v.shape for k, v in model.named_buffers() if k in state}
    check_tensors(folder, state, expected)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device).eval()


def distinct_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's parameters, each tied tensor under its first name only, and its persistent buffers (what a
    checkpoint stores); values from ``state`` (a full state dict gathered by the trainer) when given."""
    buffers = dict(model.named_buffers())
    out: dict[str, torch.Tensor] = {k: v for k, v in model.state_dict().items() if k in buffers}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            out[name] = param
    if state is not None:
        out = {k: state[k] for k in out}
    return out


def read_state(folder: str | Path, model: nn.Module, table: KeyTable, aliases: Sequence[str] = (),
               tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights of ``folder`` under ``model``'s own names, tied copies filled in (resuming a checkpoint)."""
    tensors = read_hf_tensors(folder) if tensors is None else tensors
    state = table.from_hf({k: v for k, v in tensors.items() if k not in set(aliases)})
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state
