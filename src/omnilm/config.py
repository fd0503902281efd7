"""Loading dataclass configs from YAML or JSON files and plain dicts.

Every config in omnilm is a dataclass; its field defaults are the one place each default is
documented. These helpers turn a mapping into such a dataclass and refuse unknown keys, so a typo
in a config file is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or mapping does not match the dataclass it should fill."""


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``, naming unknown keys in the error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from err


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    """Load dataclass ``cls`` from a YAML or JSON file."""
    return from_dict(cls, read_mapping(path), source=str(path))


def from_preset_or_dict(cls: type[T], presets: dict[str, T], source: str | Path | dict[str, Any],
                        kind: str) -> T:
    """Dataclass ``cls`` from a mapping or a YAML/JSON file; a ``preset`` key starts from ``presets[preset]`` and
    the other keys replace its fields (unknown keys and presets are errors naming ``kind``)."""
    values = dict(source) if isinstance(source, dict) else read_mapping(source)
    name = f"{kind} config" if isinstance(source, dict) else str(source)
    preset = values.pop("preset", None)
    if preset is None:
        return from_dict(cls, values, source=name)
    if preset not in presets:
        raise ConfigError(f"unknown {kind} preset {preset!r}; available: {sorted(presets)}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown} for {cls.__name__}")
    return dataclasses.replace(presets[preset], **values)  # type: ignore[type-var]


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for saving next to a run)."""
    return dataclasses.asdict(config)
