"""Document quality rules in the style of Gopher (Rae et al., 2021) and C4.

Each rule is a named function ``rule(doc, thresholds) -> str | None`` that returns its own name when the
document fails it and ``None`` when it passes; :func:`failed_rule` runs them in order and reports the first
failure, so every removed document is counted under exactly one rule. The thresholds and their defaults live
in :class:`QualityThresholds`; the defaults are Gopher's, except that ``min_words`` is 5 instead of 50 so that
short but clean documents (a two-sentence biography) are kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from omnilm.config import ConfigError


def _gopher_top_ngram() -> dict[int, float]:
    return {2: 0.20, 3: 0.18, 4: 0.16}


def _gopher_duplicate_ngram() -> dict[int, float]:
    return {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@dataclass
class QualityThresholds:
    """Limits of the quality rules. Fractions are in [0, 1]; an empty n-gram mapping turns that rule off."""

    min_words: int = 5  # fewer whitespace-separated words than this: too short to be a document
    max_words: int = 100_000  # more: usually a dump (logs, tables), not prose
    max_symbol_word_ratio: float = 0.1  # ('#' + '...' + '…') per word: hashtag lists, truncated snippets
    max_duplicate_line_fraction: float = 0.3  # lines that repeat an earlier line, over all non-empty lines
    max_duplicate_line_char_fraction: float = 0.2  # characters in such repeated lines, over all line characters
    # n -> largest share of word characters taken by the single most frequent n-gram (boilerplate phrases).
    max_top_ngram_fraction: dict[int, float] = field(default_factory=_gopher_top_ngram)
    # n -> largest share of word characters covered by n-grams that occur more than once (repeated passages).
    max_duplicate_ngram_fraction: dict[int, float] = field(default_factory=_gopher_duplicate_ngram)
    min_mean_word_length: float = 3.0  # shorter on average: symbol soup, code, tables
    max_mean_word_length: float = 10.0  # longer: URLs, base64, concatenated words
    min_alphabetic_word_fraction: float = 0.8  # words holding at least one letter, over all words
    max_bullet_line_fraction: float = 0.9  # lines starting with a bullet: navigation menus
    max_ellipsis_line_fraction: float = 0.3  # lines ending in an ellipsis: truncated teasers

    def __post_init__(self) -> None:
        # YAML gives int keys but JSON gives strings; both mean n.
        self.max_top_ngram_fraction = {int(n): float(v) for n, v in self.max_top_ngram_fraction.items()}
        self.max_duplicate_ngram_fraction = {int(n): float(v) for n, v in self.max_duplicate_ngram_fraction.items()}
        if self.min_words < 0 or self.max_words < self.min_words:
            raise ConfigError(f"filters: need 0 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if not 0 < self.min_mean_word_length <= self.max_mean_word_length:
            raise ConfigError("filters: need 0 < min_mean_word_length <= max_mean_word_length")
        fractions = {
            "max_duplicate_line_fraction": self.max_duplicate_line_fraction,
            "max_duplicate_line_char_fraction": self.max_duplicate_line_char_fraction,
            "min_alphabetic_word_fraction": self.min_alphabetic_word_fraction,
            "max_bullet_line_fraction": self.max_bullet_line_fraction,
            "max_ellipsis_line_fraction": self.max_ellipsis_line_fraction,
            **{f"max_top_ngram_fraction[{n}]": v for n, v in self.max_top_ngram_fraction.items()},
            **{f"max_duplicate_ngram_fraction[{n}]": v for n, v in self.max_duplicate_ngram_fraction.items()},
        }
        for name, value in fractions.items():
            if not 0 <= value <= 1:
                raise ConfigError(f"filters: {name} must be in [0, 1], got {value}")
        if any(n < 1 for n in (*self.max_top_ngram_fraction, *self.max_duplicate_ngram_fraction)):
            raise ConfigError("filters: n-gram sizes must be >= 1")


BULLETS = ("•", "●", "▪", "‣", "◦", "- ", "* ", "· ")
ELLIPSES = ("...", "…")


class Doc:
    """A document's words and lines, computed once and shared by the rules."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.split()

    @cached_property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.splitlines() if line.strip()]

    @cached_property
    def word_chars(self) -> int:
        return sum(len(w) for w in self.words)

    @cached_property
    def lower_words(self) -> list[str]:
        return [w.lower() for w in self.words]


Rule = Callable[[Doc, QualityThresholds], "str | None"]


def min_words(doc: Doc, t: QualityThresholds) -> str | None:
    return "min_words" if len(doc.words) < t.min_words else None


def max_words(doc: Doc, t: QualityThresholds) -> str | None:
    return "max_words" if len(doc.words) > t.max_words else None


def symbol_word_ratio(doc: Doc, t: QualityThresholds) -> str | None:
    symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
    return "symbol_word_ratio" if symbols > t.max_symbol_word_ratio * max(len(doc.words), 1) else None


def _repeated_lines(doc: Doc) -> list[str]:
    seen: set[str] = set()
    repeated = []
    for line in doc.lines:
        if line in seen:
            repeated.append(line)
        seen.add(line)
    return repeated


def duplicate_lines(doc: Doc, t: QualityThresholds) -> str | None:
    if not doc.lines:
        return None
    return "duplicate_lines" if len(_repeated_lines(doc)) > t.max_duplicate_line_fraction * len(doc.lines) else None


def duplicate_line_chars(doc: Doc, t: QualityThresholds) -> str | None:
    total = sum(len(line) for line in doc.lines)
    repeated = sum(len(line) for line in _repeated_lines(doc))
    return "duplicate_line_chars" if total and repeated > t.max_duplicate_line_char_fraction * total else None


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n)), strict=False))  # shorter tails end the n-grams


def top_ngram(doc: Doc, t: QualityThresholds) -> str | None:
    """Gopher: characters in the most frequent n-gram (counted at each occurrence) over all word characters."""
    for n, limit in sorted(t.max_top_ngram_fraction.items()):
        grams = _ngrams(doc.lower_words, n)
        if not grams or not doc.word_chars:
            continue
        gram, count = Counter(grams).most_common(1)[0]
        if count > 1 and count * sum(len(w) for w in gram) > limit * doc.word_chars:
            return f"top_{n}gram"
    return None


def duplicate_ngram(doc: Doc, t: QualityThresholds) -> str | None:
    """Gopher: characters of the words covered by any n-gram that occurs more than once, over all word chars."""
    words = doc.lower_words
    for n, limit in sorted(t.max_duplicate_ngram_fraction.items()):
        grams = _ngrams(words, n)
        if not grams or not doc.word_chars:
            continue
        counts = Counter(grams)
        if counts.most_common(1)[0][1] == 1:
            continue
        covered = [False] * len(words)
        for start, gram in enumerate(grams):
            if counts[gram] > 1:
                covered[start:start + n] = [True] * n
        if sum(len(w) for w, c in zip(words, covered, strict=True) if c) > limit * doc.word_chars:
            return f"duplicate_{n}gram"
    return None


def mean_word_length(doc: Doc, t: QualityThresholds) -> str | None:
    if not doc.words:
        return None
    mean = doc.word_chars / len(doc.words)
    return "mean_word_length" if not t.min_mean_word_length <= mean <= t.max_mean_word_length else None


def alphabetic_words(doc: Doc, t: QualityThresholds) -> str | None:
    if not doc.words:
        return None
    alphabetic = sum(any(ch.isalpha() for ch in w) for w in doc.words)
    return "alphabetic_words" if alphabetic < t.min_alphabetic_word_fraction * len(doc.words) else None


def bullet_lines(doc: Doc, t: QualityThresholds) -> str | None:
    if not doc.lines:
        return None
    bullets = sum(line.startswith(BULLETS) for line in doc.lines)
    return "bullet_lines" if bullets > t.max_bullet_line_fraction * len(doc.lines) else None


def ellipsis_lines(doc: Doc, t: QualityThresholds) -> str | None:
    if not doc.lines:
        return None
    truncated = sum(line.endswith(ELLIPSES) for line in doc.lines)
    return "ellipsis_lines" if truncated > t.max_ellipsis_line_fraction * len(doc.lines) else None


# Cheap rules first, so most rejected documents are caught before the n-gram counting. The line-shape rules
# go before the word rules because they name the problem better: a menu of bullets also has many words
# without letters (the bullets), and truncated teasers have many ellipsis symbols.
RULES: tuple[Rule, ...] = (min_words, max_words, bullet_lines, ellipsis_lines, symbol_word_ratio, mean_word_length,
                           alphabetic_words, duplicate_lines, duplicate_line_chars, top_ngram, duplicate_ngram)


def rule_names(thresholds: QualityThresholds) -> list[str]:
    """Every name a rule can report under ``thresholds`` (n-gram rules report one name per n)."""
    names = []
    for rule in RULES:
        if rule is top_ngram:
            names += [f"top_{n}gram" for n in sorted(thresholds.max_top_ngram_fraction)]
        elif rule is duplicate_ngram:
            names += [f"duplicate_{n}gram" for n in sorted(thresholds.max_duplicate_ngram_fraction)]
        else:
            names.append(rule.__name__)
    return names


def failed_rule(text: str, thresholds: QualityThresholds) -> str | None:
    """The name of the first rule ``text`` fails, or ``None`` when it passes them all."""
    doc = Doc(text)
    for rule in RULES:
        failed = rule(doc, thresholds)
        if failed:
            return failed
    return None
