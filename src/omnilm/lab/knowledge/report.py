"""Markdown pieces shared by the studies' reports."""

from __future__ import annotations

from collections.abc import Sequence

from omnilm.lab.knowledge.scaling import mean_std


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def pm(values: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± std`` of the values that exist, ``n/k`` noted when some runs have none; "—" when none has; just
    the value for a single run."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return "—"
    mean, std = mean_std(present)
    if len(values) == 1:  # one run has no spread to report
        return f"{mean:.{digits}f}"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if len(present) == len(values) else f"{text} ({len(present)}/{len(values)} seeds)"
