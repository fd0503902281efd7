"""Reading a reply at the pace of speech: which reply token each speech code is part of.

Written for this project. Qwen2.5-Omni's Talker reads reply token i at step i, so a short reply is all read within
its first steps, and the Talker must learn by itself where in the text its speech has got to. A small Talker trained
briefly does not learn that alignment: it says the first word and then goes on with whatever its training replies
made likely ("28 March 1943" comes out as "twenty six May nineteen sixty four"). A *paced* Talker reads, at every
step, the vector of the token whose sound the next code belongs to, so what to say next is always in its input:

- training: the assistant's replies are spoken word by word with known timings (``reply_words`` of ``omnilm data
  synth omni``), and :func:`aligned_counts` turns them into codes per reply token (a word's codes split between its
  tokens by their characters; the silence before the first word goes to the first token, the pause after a word to
  its last token, the silence after the reply to the last token);
- speaking: a :class:`DurationModel` fitted to those counts (each token's mean spoken codes, characters × a mean
  rate for tokens it never saw, plus the measured silences) predicts the counts, as a text-to-speech length
  regulator does;
- both: :func:`paced_inputs` lays out the reply track by the counts. Nothing else changes: the Talker and its
  checkpoints keep transformers' layout, and an unpaced Talker reads the track as before.

A *spelled* Talker (``DurationModel.spelled``) also reads the letters: a token's spoken codes are shared evenly by
the letters it is said as (:func:`spelled_letters`; a number's are its words as the voice reads them, "12" →
"twelve": :func:`reply_letters`), and each step's row gets a fixed vector for the letter being said plus one for
each of the next few, one vector per letter and offset (:func:`letter_rows`), scaled to the track's own size. A
token vector says which word, and the Thinker's hidden state behind it has seen only the text before it: at the
"1" of "12" it cannot know that "twelve" is coming. The letters ahead say what comes, and how it sounds, so a rare
word of several tokens ("Williamsbury") is spelled out rather than recalled as a whole. No new weights: the
vectors are drawn from fixed seeds and read through the Talker's projection like the rest of the track.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from omnilm.eval.speech import number_words
from omnilm.omni.talker import TalkerInputs
from omnilm.utils.atomic import write_json_atomic

#: The duration model's file inside a Talker folder; a Talker with one reads its replies paced.
PACING_FILE = "pacing.json"


def token_spans(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's character span in it (by decoding growing prefixes, so a
    byte-level token's share of the text is exactly what it adds)."""
    ends = [len(tokenizer.decode(list(ids[:k + 1]), skip_special_tokens=False)) for k in range(len(ids))]
    starts = [0, *ends[:-1]]
    return (tokenizer.decode(list(ids), skip_special_tokens=False) if ids else ""), list(zip(starts, ends, strict=True))


def token_words(text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(word index of each token, its characters that are not spaces): a token belongs to the word of its first
    character that is not a space (a token of spaces only, to the next word)."""
    word_of_char, word = [], -1
    for i, char in enumerate(text):
        if not char.isspace() and (i == 0 or text[i - 1].isspace()):
            word += 1
        word_of_char.append(max(word, 0))
    words, chars = [], []
    for start, end in spans:
        visible = [i for i in range(start, end) if not text[i].isspace()]
        at = visible[0] if visible else min(end, len(text) - 1)
        words.append(next((word_of_char[i] for i in range(at, len(text)) if not text[i].isspace()), word)
                     if text else 0)
        chars.append(len(visible))
    return words, chars


def _split(start: float, end: float, weights: Sequence[int]) -> list[float]:
    """Start of each piece when [start, end) is shared by ``weights`` (equal shares when all are 0)."""
    total = sum(weights)
    shares = [w / total for w in weights] if total else [1 / len(weights)] * len(weights)
    out, at = [], start
    for share in shares:
        out.append(at)
        at += share * (end - start)
    return out


def aligned_counts(tokenizer: Any, ids: Sequence[int], words: Sequence[Sequence[Any]], total: int,
                   rate: float) -> tuple[list[int], list[float]]:
    """(codes per token, spoken codes per token) of a reply of ``ids`` whose speech has ``total`` codes at ``rate``
    a second, the words said at ``words`` ([word, start s, end s]). Counts add up to ``total``; a token's count is
    its spoken share plus the silence after it (before it, for the first)."""
    text, spans = token_spans(tokenizer, ids)
    owner, chars = token_words(text, spans)
    if len(text.split()) != len(words) or (owner and max(owner) >= len(words)):
        raise ValueError(f"reply {text!r} has {len(text.split())} words; its timings list {len(words)}")
    starts, spoken = [0.0] * len(ids), [0.0] * len(ids)
    members: dict[int, list[int]] = defaultdict(list)
    for k, w in enumerate(owner):
        members[w].append(k)
    for w, tokens in members.items():
        begin, end = float(words[w][1]) * rate, float(words[w][2]) * rate
        piece_starts = _split(begin, end, [chars[k] for k in tokens])
        for k, at, after in zip(tokens, piece_starts, [*piece_starts[1:], end], strict=True):
            starts[k], spoken[k] = at, after - at
    bounds = [0] + [min(max(round(s), 0), total) for s in starts[1:]] + [total]
    for k in range(1, len(bounds)):  # rounding must not reorder
        bounds[k] = max(bounds[k], bounds[k - 1])
    return [bounds[k + 1] - bounds[k] for k in range(len(ids))], spoken


def token_letters(text: str, spans: Sequence[tuple[int, int]]) -> tuple[str, list[list[int]]]:
    """(:func:`reply_letters` of ``text``; for each token span, the indices in them of the letters it is said as)."""
    letters, where = reply_letters(text)
    return letters, [[at for share in where[start:end] for at in share] for start, end in spans]


def readings(text: str, spans: Sequence[tuple[int, int]]) -> list[str]:
    """The letters each token span is said as (:func:`token_letters`), joined."""
    letters, own = token_letters(text, spans)
    return ["".join(letters[at] for at in indices) for indices in own]


def token_readings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The letters each token of ``ids`` is said as (:func:`reply_letters`; "" for a token of spaces or
    punctuation): "Al" → "al", the "9" of "1986" → "enhundr"."""
    return readings(*token_spans(tokenizer, ids))


@dataclass
class DurationModel:
    """Codes per reply token when speaking: each token's mean spoken codes as it is said there (``per_reading``),
    else anywhere (``per_token``), else ``per_char`` × its characters (a token never seen); the silence before the
    first word (``lead``), between words (``gap``) and after the last (``trail``), in codes."""

    per_token: dict[int, float] = field(default_factory=dict)
    #: Mean spoken codes of a token said as given letters, keyed "token:letters" (:func:`token_readings`): a digit
    #: is said differently by its place in a number (the "5" of "1957" is "edandfi", of "5 May" "five"), and its
    #: mean over every number misplaces the words after it; a reading never seen falls back to ``per_token``.
    per_reading: dict[str, float] = field(default_factory=dict)
    per_char: float = 0.0
    lead: float = 0.0
    gap: float = 0.0
    trail: float = 0.0
    #: Characters a spelled Talker reads at each step: the one being said and those after it (:func:`paced_reply`);
    #: 0 for none.
    spelled: int = 0

    @classmethod
    def fit(cls, replies: Sequence[tuple[Any, Sequence[int], Sequence[Sequence[Any]], int, float]]) -> DurationModel:
        """From (tokenizer, ids, words, total codes, rate) of each training reply."""
        sums: dict[int, list[float]] = defaultdict(list)
        reading_sums: dict[str, list[float]] = defaultdict(list)
        chars_total = codes_total = 0.0
        leads, gaps, trails = [], [], []
        for tokenizer, ids, words, total, rate in replies:
            _, spoken = aligned_counts(tokenizer, ids, words, total, rate)
            text, spans = token_spans(tokenizer, ids)
            _, chars = token_words(text, spans)
            for token, codes, count, reading in zip(ids, spoken, chars, readings(text, spans), strict=True):
                sums[int(token)].append(codes)
                reading_sums[f"{int(token)}:{reading}"].append(codes)
                chars_total += count
                codes_total += codes
            leads.append(float(words[0][1]) * rate)
            trails.append(total - float(words[-1][2]) * rate)
            gaps += [(float(b[1]) - float(a[2])) * rate for a, b in zip(words, words[1:], strict=False)]

        def mean(values: Sequence[float]) -> float:
            return sum(values) / len(values) if values else 0.0

        return cls({token: mean(values) for token, values in sums.items()},
                   {key: mean(values) for key, values in reading_sums.items()}, codes_total / max(chars_total, 1.0),
                   mean(leads), mean(gaps), mean(trails))

    def counts(self, tokenizer: Any, ids: Sequence[int]) -> list[int]:
        """Predicted codes per token of a reply (boundaries rounded from the running sum, so rounding does not
        drift; at least one code in all)."""
        return self.plan(tokenizer, ids)[0]

    def plan(self, tokenizer: Any, ids: Sequence[int]) -> tuple[list[int], list[float]]:
        """(predicted codes per token, predicted spoken codes per token): :meth:`counts`, and the part of each count
        that is speech rather than silence (as :func:`aligned_counts` returns them for a recorded reply)."""
        if not ids:
            return [], []
        text, spans = token_spans(tokenizer, ids)
        owner, chars = token_words(text, spans)
        spoken = [self.per_reading.get(f"{int(t)}:{reading}", self.per_token.get(int(t), self.per_char * c))
                  for t, c, reading in zip(ids, chars, readings(text, spans), strict=True)]
        lengths = list(spoken)
        lengths[0] += self.lead
        for k in range(len(ids) - 1):
            if owner[k + 1] != owner[k]:
                lengths[k] += self.gap
        lengths[-1] += self.trail
        bounds, at = [0], 0.0
        for length in lengths:
            at += length
            bounds.append(max(round(at), bounds[-1]))
        bounds[-1] = max(bounds[-1], 1)
        return [bounds[k + 1] - bounds[k] for k in range(len(ids))], spoken

    def save(self, folder: str | Path) -> None:
        write_json_atomic(Path(folder) / PACING_FILE,
                          asdict(self) | {"per_token": {str(k): v for k, v in self.per_token.items()}})

    @classmethod
    def load(cls, folder: str | Path) -> DurationModel | None:
        """The folder's duration model, or None when its Talker is not paced."""
        path = Path(folder) / PACING_FILE
        if not path.is_file():
            return None
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return cls(**(data | {"per_token": {int(k): float(v) for k, v in data["per_token"].items()}}))


def reply_letters(text: str) -> tuple[str, list[list[int]]]:
    """(the letters of ``text`` as it is said, lower-cased, numbers written out in the words the voice says
    (:func:`~omnilm.eval.speech.number_words`, with espeak-ng's "and": "1986" → "nineteen hundred and eighty six"),
    each run of other characters one space; for each character of ``text``, the indices in them of the letters it
    is said as: its own for a letter, an even share of its number's letters (spaces aside) for a digit, none for
    the rest; the comma of "3,000" is not said)."""
    letters, where = "", []

    def space() -> None:
        nonlocal letters
        if letters and letters[-1] != " ":
            letters += " "

    for run in re.finditer(r"(?P<number>\d{1,3}(?:,\d{3})+(?!\d)|\d+)|(?P<word>[^\W\d_]+)|[\W_]+", text):
        chunk = run.group()
        if run.group("number"):
            space()
            digits = chunk.replace(",", "")  # thousands separators are not said
            words = " ".join(number_words(digits, british=True))
            said = [len(letters) + i for i, char in enumerate(words) if char != " "]
            letters += words + " "  # a number is words of its own
            shares = iter(said[j * len(said) // len(digits):(j + 1) * len(said) // len(digits)]
                          for j in range(len(digits)))
            where += [[] if char == "," else next(shares) for char in chunk]
        elif run.group("word"):
            where += [[len(letters) + i] for i in range(len(chunk))]
            letters += chunk.lower()
        else:
            where += [[] for _ in chunk]
            space()
    return letters.rstrip(), where


def spelled_letters(tokenizer: Any, ids: Sequence[int], counts: Sequence[int], spoken: Sequence[float],
                    ) -> tuple[str, list[int | None]]:
    """(the reply's letters, :func:`reply_letters`; the index in them of the character said at each code of the
    reply laid out by ``counts``, None in silence). Token k's spoken codes (``spoken[k]``, rounded, at most its
    count) open its slot, except token 0's, which close it (the silence before the first word is its slot's
    start); its letters and digits share them evenly."""
    text, spans = token_spans(tokenizer, ids)
    letters, token_own = token_letters(text, spans)
    out: list[int | None] = []
    for k, (own, count) in enumerate(zip(token_own, counts, strict=True)):
        said = min(max(round(spoken[k]), 0), count) if own else 0
        silence: list[int | None] = [None] * (count - said)
        sounds: list[int | None] = [own[j * len(own) // said] for j in range(said)]
        out += silence + sounds if k == 0 else sounds + silence
    return letters, out


@lru_cache(maxsize=4096)
def letter_code(char: str, offset: int, width: int) -> torch.Tensor:
    """A fixed random vector (width ``width``, unit root mean square in expectation) for ``char`` read ``offset``
    characters ahead of the one being said: seeded by the pair, so every process draws the same one."""
    seed = zlib.crc32(f"{offset}:{char}".encode())
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


def letter_rows(letters: str, said: Sequence[int | None], width: int, ahead: int) -> torch.Tensor:
    """(1, N, width): for each code, the sum of :func:`letter_code` of the character said (``said``: its index in
    ``letters``) and the ``ahead`` − 1 after it, each at its offset; a zero row in silence."""
    rows = torch.zeros(1, len(said), width)
    for i, at in enumerate(said):
        if at is not None:
            for offset, char in enumerate(letters[at:at + ahead]):
                rows[0, i] += letter_code(char, offset, width)
    return rows


def paced_inputs(inputs: TalkerInputs, counts: Sequence[int], letters: torch.Tensor | None = None) -> TalkerInputs:
    """``inputs`` (from :func:`~omnilm.omni.talker.talker_inputs`, reply tokens 0..K−1) with the reply track laid out
    by ``counts`` (K codes per token, N in all): step i, which predicts code i + 1, reads the vector of the token code
    i + 1 is part of; step N − 1, which predicts the end, reads text end; then padding. Token 0's vector is the
    prompt's last row, as in the unpaced track.

    ``letters`` (1, N, E), a spelled Talker's letter vectors per code (:func:`letter_rows`): step i's row also
    gets code i + 1's, scaled to the root mean square of the reply's token vectors."""
    tokens = torch.cat([inputs.prompt[:, -1:], inputs.reply[:, :-2]], dim=1)  # (1, K, E)
    if tokens.shape[1] != len(counts):
        raise ValueError(f"{len(counts)} counts for a reply of {tokens.shape[1]} tokens")
    owner = torch.repeat_interleave(torch.arange(len(counts), device=tokens.device),
                                    torch.as_tensor(list(counts), device=tokens.device))
    rows = tokens[:, owner[1:]]
    if letters is not None:
        if letters.shape[1] != len(owner):
            raise ValueError(f"{letters.shape[1]} letter rows for {len(owner)} codes")
        said = letters[:, 1:]
        rows = rows + said / said.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12) * tokens.pow(2).mean().sqrt()
    return replace(inputs, reply=torch.cat([rows, inputs.reply[:, -2:]], dim=1))


def paced_reply(inputs: TalkerInputs, counts: Sequence[int], spoken: Sequence[float], spelled: int, tokenizer: Any,
                ids: Sequence[int]) -> TalkerInputs:
    """:func:`paced_inputs` of reply ``ids``, codes per token ``counts`` of which ``spoken`` are speech; a
    ``spelled`` Talker also reads, at each code, the character said and the ``spelled`` − 1 after it
    (:func:`spelled_letters`, :func:`letter_rows`)."""
    if not spelled:
        return paced_inputs(inputs, counts)
    letters, said = spelled_letters(tokenizer, ids, counts, spoken)
    rows = letter_rows(letters, said, inputs.reply.shape[-1], spelled)
    return paced_inputs(inputs, counts, rows.to(inputs.reply))
