"""Fingerprints of settings and readable differences between two settings mappings.

A finished job or stage records the fingerprint of what produced it; a later run compares fingerprints to
decide whether the result is still current and, when it is not, names what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

UNSET = "(unset)"  # how a key present on one side only is shown


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no whitespace: equal settings give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(value: Any) -> str:
    """A short hash (16 hex digits of SHA-256) of ``value``'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:16]


def relative_paths(value: Any, root: str | Path) -> Any:
    """``value`` with every absolute path string inside ``root`` made relative to it (recursively).

    Fingerprints are taken of this form, so a run folder that is moved or copied elsewhere still recognises
    its own results.
    """
    if isinstance(value, dict):
        return {k: relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [relative_paths(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        root = Path(root).resolve()
        path = Path(value).resolve()
        if path == root or path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return value


_MISSING = object()


def _show(value: Any) -> str:
    return UNSET if value is _MISSING else json.dumps(value, ensure_ascii=False, default=str)


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The differences between two nested mappings, one ``dotted.key: old → new`` line per changed leaf.

    Mappings present on both sides are compared key by key; anything else (lists, scalars, a mapping on one
    side only) is compared whole. A key present on one side only shows ``(unset)`` on the other.
    """
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines += changed_keys(a, b, prefix=f"{path}.")
        elif a is _MISSING or b is _MISSING or canonical_json(a) != canonical_json(b):
            lines.append(f"{path}: {_show(a)} → {_show(b)}")
    return lines


def stale_reasons(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why a recorded result no longer matches: changed ``settings`` keys and changed ``upstream`` producers.

    Both arguments are records ``{"settings": mapping, "upstream": {label: fingerprint}}``.
    """
    reasons = changed_keys(old.get("settings") or {}, new.get("settings") or {})
    before, after = old.get("upstream") or {}, new.get("upstream") or {}
    for label in sorted(set(before) | set(after)):
        if label not in after:
            reasons.append(f"no longer reads {label}")
        elif label not in before:
            reasons.append(f"now reads {label}")
        elif before[label] != after[label]:
            reasons.append(f"upstream {label} changed")
    return reasons
