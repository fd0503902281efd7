"""Exact and near-duplicate detection over a stream of documents; the first occurrence is always kept.

Exact: a BLAKE2b digest of the text after NFC, lower-casing and whitespace collapsing, so documents that differ
only in case or spacing count as one.

Near: MinHash signatures of word shingles (``shingle_size`` consecutive words) indexed by ``datasketch``'s
MinHashLSH. LSH only proposes candidates, with banding weighted towards few false negatives; a candidate counts as
a duplicate when the estimated Jaccard similarity of the two signatures reaches ``threshold``, which removes the
banding's false positives.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)
_MIX = np.uint64(0x01000193)  # the 32-bit FNV prime: spreads each word's hash before the next is mixed in
_CHUNK = 4096  # shingles per MinHash update: bounds memory to _CHUNK x num_perm per step on huge documents


def exact_key(text: str) -> bytes:
    """A 16-byte digest that is equal for texts differing only in Unicode form, case or whitespace."""
    canonical = " ".join(unicodedata.normalize("NFC", text).lower().split())
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


class ExactDeduper:
    """Remembers the digest of every document seen and where it was first seen."""

    def __init__(self) -> None:
        self._first: dict[bytes, str] = {}

    def check(self, text: str, where: str) -> str | None:
        """``where`` of the earlier identical document, or ``None`` (and remember this one) when it is new."""
        key = exact_key(text)
        first = self._first.get(key)
        if first is None:
            self._first[key] = where
        return first


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """32-bit hashes of the word ``shingle_size``-grams of ``text`` (lower-cased, punctuation ignored).

    A text shorter than one shingle gives a single shingle of all its words; a text without words gives none.
    """
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    # Hash each word once (crc32 is stable across processes, unlike ``hash``) and combine neighbours with
    # numpy, instead of building and hashing every shingle string.
    word_hashes = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    n = min(shingle_size, len(words))
    count = len(words) - n + 1
    hashes = word_hashes[:count].copy()
    for offset in range(1, n):
        hashes = ((hashes * _MIX) & _MASK32) ^ word_hashes[offset:offset + count]
    return np.unique(hashes)


def _identity(value: int) -> int:
    return value


class NearDeduper:
    """Streaming near-duplicate detection: :meth:`check` each document in order."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 5, seed: int = 1) -> None:
        from datasketch import MinHash, MinHashLSH

        if not 0 < threshold <= 1:
            raise ValueError(f"near-dedup threshold must be in (0, 1], got {threshold}")
        if shingle_size < 1:
            raise ValueError(f"shingle size must be >= 1, got {shingle_size}")
        if num_perm < 2:
            raise ValueError(f"num_perm must be >= 2, got {num_perm}")
        self.threshold = threshold
        self.shingle_size = shingle_size
        # Every signature shares one set of permutation parameters: building them per document would cost
        # more than hashing a short document, and 2 x num_perm integers of memory per kept document.
        template = MinHash(num_perm=num_perm, seed=seed)
        self._minhash_args: dict[str, object] = dict(num_perm=num_perm, seed=seed, hashfunc=_identity,
                                                     permutations=template.permutations)
        if hasattr(template, "scheme"):  # datasketch >= 2 refuses shared permutations without their scheme
            self._minhash_args["scheme"] = template.scheme
        # Banding tuned to miss fewer true duplicates at the price of more candidates: with equal weights
        # (datasketch's default) about one pair in six at Jaccard 0.86 is never proposed at threshold 0.8, and
        # the extra candidates cost only a signature comparison each, which also rejects them.
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.2, 0.8))
        self._kept: dict[str, np.ndarray] = {}  # where -> signature of each kept document, to verify candidates
        self._order: dict[str, int] = {}  # where -> position, so the earliest of several matches is reported

    def signature(self, text: str) -> object | None:
        """The ``datasketch.MinHash`` of ``text``'s shingles, or ``None`` for a text without words."""
        from datasketch import MinHash

        hashes = shingle_hashes(text, self.shingle_size)
        if not len(hashes):
            return None
        minhash = MinHash(**self._minhash_args)  # type: ignore[arg-type]
        for start in range(0, len(hashes), _CHUNK):
            minhash.update_batch(hashes[start:start + _CHUNK].tolist())
        return minhash

    def check(self, text: str, where: str) -> str | None:
        """``where`` of the earliest kept document ``text`` nearly duplicates, or ``None`` (and keep it)."""
        minhash = self.signature(text)
        if minhash is None:
            return None
        values = minhash.hashvalues  # type: ignore[attr-defined]
        matches = [key for key in self._lsh.query(minhash)
                   if np.count_nonzero(values == self._kept[key]) >= self.threshold * len(values)]
        if matches:
            return min(matches, key=self._order.__getitem__)
        if where in self._kept:
            raise ValueError(f"{where}: document key used twice")
        self._lsh.insert(where, minhash)
        self._kept[where] = values
        self._order[where] = len(self._order)
        return None
