"""Recipes: a YAML file of data-preparation jobs and ordered training stages, with named size presets.

```yaml
name: demo
prepare:            # jobs run in order; each is skipped once its output is complete
  bios: {job: synth_bios, people: 300}
  tokenizer: {job: tokenizer, data: [bios/train.jsonl], vocab_size: 2048}
stages:             # run in order; each starts from the previous stage's final model
  pretrain:
    type: pretrain
    model: {preset: tiny}
    data: {bios: tokens}
    train: {max_steps: 1000}
    evals: {completion: {type: attributes, data: bios/eval.jsonl}}
presets:            # deep-merged over the recipe by `omnilm run --preset NAME`
  smoke: {prepare: {bios: {people: 40}}, stages: {pretrain: {train: {max_steps: 50}}}}
```
Relative paths inside a recipe are relative to the run folder. Jobs and stages are mappings keyed by name so
that presets can reach into them. A preset's new stage would come last; a stage that must run between others
only in some presets is declared in its place with ``skip: true`` (left out of the run, its evaluations too)
and the preset sets ``skip: false``. A preset leaves out a job, a stage or an evaluation the same way, by
setting its ``skip: true``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omnilm.config import ConfigError, read_mapping

BUILTIN_PACKAGE = "omnilm.recipe.builtin"


@dataclass
class Recipe:
    name: str
    prepare: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""


def builtin_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(BUILTIN_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in recursively (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(name_or_path: str, preset: str | None = None) -> Recipe:
    """A built-in recipe by name (``demo``) or a YAML file, with ``preset`` applied (``a,b``: both, in order)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        values, source = read_mapping(path), str(path)
    elif name_or_path in builtin_recipes():
        import yaml

        text = resources.files(BUILTIN_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        values, source = yaml.safe_load(text), f"built-in recipe {name_or_path!r}"
    else:
        raise ConfigError(f"recipe {name_or_path!r}: no such file and no built-in recipe of that name "
                          f"(built-in: {', '.join(builtin_recipes())})")
    presets = values.pop("presets", {}) or {}
    for name in preset.split(",") if preset else []:  # several presets merge in the order given
        if name not in presets:
            raise ConfigError(f"{source}: no preset {name!r} (presets: {', '.join(sorted(presets)) or 'none'})")
        values = deep_merge(values, presets[name])
    unknown = sorted(set(values) - {"name", "prepare", "stages"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; expected name, prepare, stages, presets")
    for section in ("prepare", "stages"):
        if not isinstance(values.get(section, {}) or {}, dict):
            raise ConfigError(f"{source}: {section} must be a mapping from names to settings")
    return Recipe(name=values.get("name") or path.stem, prepare=values.get("prepare") or {},
                  stages=values.get("stages") or {}, source=source)
