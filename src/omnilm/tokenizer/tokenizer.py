"""A thin wrapper over a ``tokenizers.Tokenizer`` that knows the model folder's special tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from omnilm.tokenizer.chat import CHAT_TEMPLATE, IM_END, IM_START
from omnilm.utils.atomic import write_json_atomic, write_text_atomic

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids, backed by the ``tokenizers`` library (``tokenizer.json``)."""

    def __init__(self, backend: BackendTokenizer, eos_token: str | None = EOS_TOKEN,
                 bos_token: str | None = None, pad_token: str | None = PAD_TOKEN,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        # Every saved folder carries the chat format, unless the loaded one brought its own.
        self.extra_config = {"chat_template": CHAT_TEMPLATE} | dict(extra_config or {})

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` if present) from a model folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: missing file tokenizer.json")
        backend = BackendTokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        vocab = backend.get_vocab(with_added_tokens=True)

        def special(key: str, fallback: str | None) -> str | None:
            value = _token_text(config.get(key))
            if value is None and fallback in vocab:
                value = fallback
            return value

        extra = {k: v for k, v in config.items() if k not in ("eos_token", "bos_token", "pad_token")}
        return cls(backend, special("eos_token", EOS_TOKEN), special("bos_token", None),
                   special("pad_token", PAD_TOKEN), extra)

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by ``transformers.AutoTokenizer``)."""
        folder = Path(folder)
        write_text_atomic(folder / "tokenizer.json", self.backend.to_str())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": 1_000_000} | self.extra_config
        config |= {"eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token}
        write_json_atomic(folder / "tokenizer_config.json", config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``. Special-token strings in the text map to their ids, or with ``special=False``
        are encoded as the plain text they are (what user-supplied text needs: it cannot inject control tokens)."""
        backend = self.backend if special else self.plain_backend
        return backend.encode(text, add_special_tokens=False).ids

    @property
    def plain_backend(self) -> BackendTokenizer:
        """A copy of the backend that encodes special-token strings as plain text (a separate object, because the
        switch is state of the backend and other threads may be encoding with the usual one)."""
        if getattr(self, "_plain", None) is None:
            plain = BackendTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add ``tokens`` as special tokens (those already present are kept); their ids, in order."""
        self.backend.add_special_tokens([t for t in tokens if self.backend.token_to_id(t) is None])
        self._plain = None  # the plain-text copy is rebuilt with the new vocabulary
        return [self.backend.token_to_id(t) for t in tokens]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
