"""Log-probabilities of tokens: what the engine records, and how the server reports them in OpenAI's formats.

**What is recorded.** For a token it reads or samples the engine keeps a :class:`TokenLogprob`: the token, its
log-probability and the ``k`` most likely tokens with theirs, all taken from one ``log_softmax`` of the logits
of the step (:func:`logprob_records`). The distribution is the model's own: before repetition penalty,
temperature and top-k/top-p/min-p filtering, as OpenAI's API reports it. A greedy token is therefore the first of
its top list (without a repetition penalty), and a sampled token is one the filters kept, whatever its rank.
Because the token's value and the top values are elements of the same tensor, ``logprob == top[0]`` holds
exactly when the token is the most likely one (what lm-eval's ``is_greedy`` compares).

Prompt tokens (``echo`` with ``logprobs``) are scored by the forward passes that prefill the prompt, batched with
whatever else the step runs: the logits at position ``p`` give the log-probability of prompt token ``p + 1``; the
first prompt token has none (null in the API).

**How it is reported.** Token text is the token's bytes (:class:`TokenText`) decoded as UTF-8; a token whose bytes
are not whole UTF-8 characters (byte-level BPE splits characters between tokens) is written ``bytes:\\xe6\\x9d``.
Chat logprobs also give each token's ``bytes``, so joining them restores the text exactly. A completion's
``text_offset`` says where each token's text starts in the choice's ``text`` (:class:`Offsets`); a token that is
only part of a character (split over several tokens, or a stray byte shown as U+FFFD) points at that character.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import torch

#: The most alternatives a request may ask for per token (``logprobs`` of completions, ``top_logprobs`` of chat).
MAX_TOP_LOGPROBS = 20
REPLACEMENT_CHAR = "\ufffd"


class TokenLogprob(NamedTuple):
    """One token's log-probability and the most likely tokens at its position (most likely first)."""

    token: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


def logprob_records(logits: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """A record per row of ``logits`` (N, V) for the token of that row (``tokens`` (N,)), with ``ks[i]`` top
    alternatives; one ``log_softmax`` and one ``topk`` for all rows."""
    logp = logits.float().log_softmax(-1)  # (N, V)
    chosen = logp.gather(-1, tokens[:, None].to(logp.device))[:, 0].tolist()  # (N,)
    k = max(ks, default=0)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())  # (N, k)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(token, value, tuple(ids[:n]), tuple(values[:n]))
            for token, value, ids, values, n in zip(tokens.tolist(), chosen, top_ids, top_values, ks, strict=True)]


def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


class TokenText:
    """The bytes and the displayed text of each token id of a tokenizer (cached per id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        self.byte_level = byte_level_table() if decoder.get("type") == "ByteLevel" else None
        self.added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a special token: its text)."""
        cached = self._bytes.get(token)
        if cached is not None:
            return cached
        if token in self.added:
            value = self.added[token].encode()
        else:
            piece = self.tokenizer.backend.id_to_token(token)
            if piece is None:
                value = b""
            elif self.byte_level is not None and all(c in self.byte_level for c in piece):
                value = bytes(self.byte_level[c] for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
                value = bytes([int(piece[3:5], 16)])
            else:
                value = self.tokenizer.decode([token]).encode()
        self._bytes[token] = value
        return value

    def text(self, token: int) -> str:
        """The token's text, or ``bytes:\\xNN...`` when its bytes are not whole UTF-8 characters."""
        value = self.bytes(token)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in value)

    def top(self, record: TokenLogprob) -> dict[str, float]:
        """``{text: logprob}`` of the record's alternatives, most likely first (of tokens with the same text, the
        more likely is kept, so the largest value is always there)."""
        out: dict[str, float] = {}
        for token, value in zip(record.top_ids, record.top_logprobs, strict=True):
            out.setdefault(self.text(token), value)
        return out

    def chat_entry(self, record: TokenLogprob) -> dict[str, Any]:
        """An entry of chat ``logprobs.content``."""

        def one(token: int, value: float) -> dict[str, Any]:
            return {"token": self.text(token), "logprob": value, "bytes": list(self.bytes(token))}

        return one(record.token, record.logprob) | {
            "top_logprobs": [one(t, v) for t, v in zip(record.top_ids, record.top_logprobs, strict=True)]}


class Offsets:
    """Incremental detokenisation that says where each token's text starts.

    ``push(token)`` returns the offset of the token's text in ``text``, which then holds every character the tokens
    so far complete. Text is decoded over a short window of tokens, as streaming detokenisers do, so a long prompt
    costs linear time. A token that is only part of a character (decoded as U+FFFD until a later token completes
    it) is not added yet and points at where that character starts; a token that completes one points at its own
    text, which ends the new text.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded already: the context of the next ones
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> int:
        offset = len(self.text)
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            new = after[len(before):]
            own = self._decode([token])
            if own and REPLACEMENT_CHAR not in own and new.endswith(own):
                offset += len(new) - len(own)  # after the characters that earlier tokens began
            self.text += new
            self.prefix, self.read = self.read, len(self.ids)
        return offset

    def finish(self) -> str:
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.prefix = self.read = len(self.ids)
        return self.text


def completion_logprobs(names: TokenText, tokens: list[int], records: list[TokenLogprob | None],
                        offsets: list[int]) -> dict[str, Any]:
    """A completion choice's ``logprobs`` for ``tokens``; ``records[i]`` is None for a prompt's first token, which
    has no log-probability (null in ``token_logprobs`` and ``top_logprobs``)."""
    return {"tokens": [names.text(t) for t in tokens],
            "token_logprobs": [r.logprob if r is not None else None for r in records],
            "top_logprobs": [names.top(r) if r is not None else None for r in records],
            "text_offset": offsets}
