"""Special tokens that the encoder and encoder–decoder families need beyond omnilm's own.

BERT/ELECTRA mark sequences with ``[CLS]`` … ``[SEP]``, pad with ``[PAD]`` and mask with ``[MASK]``; T5 marks
dropped spans with sentinels ``<extra_id_0>``, ``<extra_id_1>``, … (100 in T5's vocabulary); BART masks with
``<mask>``. ``omnilm tokenizer train --family F`` adds them when training; ``ensure_family_tokens`` adds them to an
existing tokenizer (a stage starting from a tokenizer trained for a decoder), growing its vocabulary.
"""

from __future__ import annotations

from typing import Any

ENCODER_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")
BART_MASK = "<mask>"
T5_SENTINELS = 100


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def family_special_tokens(family: str, sentinels: int = T5_SENTINELS) -> tuple[str, ...]:
    """The special tokens ``family`` adds (none for the decoder families)."""
    if family in ("bert", "electra"):
        return ENCODER_TOKENS
    if family == "t5":
        return tuple(sentinel(i) for i in range(sentinels))
    if family == "bart":
        return (BART_MASK,)
    return ()


def ensure_family_tokens(tokenizer: Any, family: str, sentinels: int = T5_SENTINELS) -> dict[str, int]:
    """Add ``family``'s special tokens to ``tokenizer`` where missing; their ids by token (for T5 also the key
    ``sentinels`` is absent: use ``sentinel_ids``)."""
    tokens = family_special_tokens(family, sentinels)
    return dict(zip(tokens, tokenizer.add_special_tokens(list(tokens)), strict=True))


def sentinel_ids(tokenizer: Any, count: int = T5_SENTINELS) -> list[int]:
    """Ids of ``<extra_id_0>`` … in order (added to the tokenizer when missing)."""
    return tokenizer.add_special_tokens([sentinel(i) for i in range(count)])
