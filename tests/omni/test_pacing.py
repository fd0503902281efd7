"""Pacing a Talker's reply track: alignments of words to tokens, the duration model, the track layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.omni.pacing import (
    DurationModel,
    aligned_counts,
    letter_code,
    letter_rows,
    paced_inputs,
    reply_letters,
    spelled_letters,
    token_readings,
    token_spans,
    token_words,
)
from omnilm.omni.talker import TalkerInputs

RATE = 50.0
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789,-", min_size=1, max_size=12)


def timed(words: list[str], durations: list[int], gap: int, lead: int, trail: int) -> tuple[list[list], int]:
    """Word timings on the code grid (durations, gaps and edges in codes) and the total codes."""
    out, at = [], lead
    for k, (word, length) in enumerate(zip(words, durations, strict=True)):
        if k:
            at += gap
        out.append([word, at / RATE, (at + length) / RATE])
        at += length
    return out, at + trail


def test_token_spans_cover_the_text_and_words_follow_the_first_visible_character(tokenizer) -> None:  # noqa: ANN001
    text = "Port Angelafurt Institute of 1943"
    ids = tokenizer.encode(text, special=False)
    decoded, spans = token_spans(tokenizer, ids)
    assert decoded == text and spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    owner, chars = token_words(text, spans)
    assert sum(chars) == len(text.replace(" ", ""))
    for (start, end), word in zip(spans, owner, strict=True):
        piece = text[start:end].strip()
        if piece:
            assert piece in text.split()[word]


@settings(max_examples=60, deadline=None)
@given(words=st.lists(WORD, min_size=1, max_size=6), data=st.data())
def test_aligned_counts_give_each_word_its_own_codes(tokenizer, words: list[str], data: st.DataObject) -> None:  # noqa: ANN001
    """Counts add up to the whole utterance, and every code inside a word's time belongs to a token of that word
    (brute force over the codes)."""
    durations = data.draw(st.lists(st.integers(1, 30), min_size=len(words), max_size=len(words)))
    gap, lead, trail = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5))
    timings, total = timed(words, durations, gap, lead, trail)
    ids = tokenizer.encode(" ".join(words), special=False)
    counts, spoken = aligned_counts(tokenizer, ids, timings, total, RATE)
    assert sum(counts) == total and min(counts) >= 0
    assert abs(sum(spoken) - sum(durations)) < 1e-6
    text, spans = token_spans(tokenizer, ids)
    owner, _ = token_words(text, spans)
    code_owner = [k for k, count in enumerate(counts) for _ in range(count)]
    for w, (_, start, end) in enumerate(timings):
        for code in range(round(start * RATE), round(end * RATE)):
            assert owner[code_owner[code]] == w


@settings(max_examples=30, deadline=None)
@given(words=st.lists(WORD, min_size=1, max_size=5), data=st.data())
def test_a_duration_model_fitted_to_consistent_speech_predicts_its_counts(tokenizer, words: list[str],  # noqa: ANN001
                                                                         data: st.DataObject) -> None:
    """When every token always lasts as long and the silences are fixed, the fitted model gives back the aligned
    counts (to rounding: each boundary within one code)."""
    ids = tokenizer.encode(" ".join(words), special=False)
    text, spans = token_spans(tokenizer, ids)
    _, chars = token_words(text, spans)
    per_token = {int(t): 2 * c + 1 for t, c in zip(ids, chars, strict=True)}
    owner, _ = token_words(text, spans)
    durations = [sum(per_token[int(t)] - (0 if c else 1) for t, c, o in zip(ids, chars, owner, strict=True) if o == w)
                 for w in range(len(words))]
    if min(durations) < 1:
        return
    gap, lead, trail = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    timings, total = timed(words, durations, gap, lead, trail)
    counts, _ = aligned_counts(tokenizer, ids, timings, total, RATE)
    model = DurationModel.fit([(tokenizer, ids, timings, total, RATE)])
    predicted = model.counts(tokenizer, ids)
    assert abs(sum(predicted) - total) <= 1
    bounds = torch.tensor(counts).cumsum(0)
    assert (torch.tensor(predicted).cumsum(0) - bounds).abs().max() <= 1


def test_duration_model_round_trip_and_unseen_tokens(tmp_path, tokenizer) -> None:  # noqa: ANN001
    ids = tokenizer.encode("red sky", special=False)
    timings, total = timed(["red", "sky"], [10, 12], 3, 2, 2)
    model = DurationModel.fit([(tokenizer, ids, timings, total, RATE)])
    model.save(tmp_path)
    assert DurationModel.load(tmp_path) == model
    assert DurationModel.load(tmp_path / "elsewhere") is None
    unseen = tokenizer.encode("zebra", special=False)
    assert sum(model.counts(tokenizer, unseen)) == round(model.lead + model.trail + model.per_char * 5)


def test_a_digit_lasts_as_long_as_it_did_where_it_was_said_the_same_way(tokenizer) -> None:  # noqa: ANN001
    """The "5" of "5 May" ("five") and the "5"s of "1955" ("edandfi", "ftyfive") each keep their own duration; a
    reading never seen falls back to the token's mean over all of them."""
    replies = [("5 May", [["5", 0.1, 0.3], ["May", 0.36, 0.6]]), ("1955", [["1955", 0.1, 1.7]])]
    fitted = []
    for text, words in replies:
        ids = tokenizer.encode(text, special=False)
        total = round(words[-1][2] * RATE) + 3
        fitted.append((tokenizer, ids, words, total, RATE))
    model = DurationModel.fit(fitted)
    for _, ids, words, total, _ in fitted:
        _, spoken = aligned_counts(tokenizer, ids, words, total, RATE)
        assert model.plan(tokenizer, ids)[1] == pytest.approx(spoken)
    five = tokenizer.encode("5", special=False)
    assert token_readings(tokenizer, five) == ["five"]
    said = {reading: model.per_reading[f"{five[0]}:{reading}"] for reading in ("five", "edandfi", "ftyfive")}
    assert said == pytest.approx({"five": 10.0, "edandfi": 20.0, "ftyfive": 20.0})
    fifteen = tokenizer.encode("15", special=False)  # its "5" is said "teen", never fitted
    assert token_readings(tokenizer, fifteen)[-1] == "teen"
    assert model.plan(tokenizer, fifteen)[1][-1] == pytest.approx((10.0 + 20.0 + 20.0) / 3)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=6).filter(lambda c: sum(c) >= 1))
def test_the_paced_track_reads_the_token_of_the_next_code(counts: list[int]) -> None:
    k, width = len(counts), 4
    prompt = torch.randn(1, 5, width)
    track = torch.randn(1, k + 1, width)  # tokens 1..K-1, text end, pad
    paced = paced_inputs(TalkerInputs(prompt, torch.zeros(3, 1, 5, dtype=torch.long), track), counts)
    tokens = [prompt[0, -1]] + [track[0, j] for j in range(k - 1)]
    owner = [t for t, count in enumerate(counts) for _ in range(count)]
    total = len(owner)
    assert paced.reply.shape[1] == total + 1
    for step in range(total - 1):
        torch.testing.assert_close(paced.reply[0, step], tokens[owner[step + 1]])
    torch.testing.assert_close(paced.reply[0, total - 1], track[0, -2])
    torch.testing.assert_close(paced.reply_rows(total, 3)[0], track[0, -1:].expand(3, -1))


def test_reply_letters_keep_letters_say_numbers_and_one_space_between_words() -> None:
    text = "Alvarez-Perez, 12 May 1986 or 3,000."
    letters, where = reply_letters(text)
    assert letters == "alvarez perez twelve may nineteen hundred and eighty six or three thousand"
    assert "".join(letters[at] for said in where for at in said) == letters.replace(" ", "")
    assert where[7] == [] and letters[where[8][0]] == "p"
    assert [len(where[text.index("1986") + k]) for k in range(4)] == [6, 7, 7, 7]  # 27 letters in even shares
    assert where[text.index(",000")] == []
    assert reply_letters("A4b")[0] == "a four b"


@settings(max_examples=60, deadline=None)
@given(words=st.lists(WORD, min_size=1, max_size=6), data=st.data())
def test_spelled_letters_follow_the_words_through_their_spoken_codes(tokenizer, words: list[str],  # noqa: ANN001
                                                                     data: st.DataObject) -> None:
    """One letter (or None) per code; silence only outside the words' times; inside a token its letters come in
    order, all of them when it has at least as many codes; every code well inside a word says one of its letters."""
    durations = data.draw(st.lists(st.integers(1, 30), min_size=len(words), max_size=len(words)))
    gap, lead, trail = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5))
    timings, total = timed(words, durations, gap, lead, trail)
    ids = tokenizer.encode(" ".join(words), special=False)
    counts, spoken = aligned_counts(tokenizer, ids, timings, total, RATE)
    letters, said = spelled_letters(tokenizer, ids, counts, spoken)
    assert len(said) == total and letters == reply_letters(" ".join(words))[0]
    text, spans = token_spans(tokenizer, ids)
    where = reply_letters(text)[1]
    at = 0
    for k, ((start, end), count) in enumerate(zip(spans, counts, strict=True)):
        own = [i for said in where[start:end] for i in said]
        piece = said[at:at + count]
        heard = [i for i in piece if i is not None]
        assert heard == sorted(heard) and set(heard) <= set(own)
        assert len(heard) == (min(max(round(spoken[k]), 0), count) if own else 0)
        if own and len(heard) >= len(own):
            assert set(heard) == set(own)
        silence = piece[:count - len(heard)] if k == 0 else piece[len(heard):]
        assert all(i is None for i in silence)
        at += count
    for w, (_, start, end) in enumerate(timings):
        alnum = set(reply_letters(words[w])[0])
        inside = said[round(start * RATE) + 1:round(end * RATE) - 1]
        assert all(letters[i] in alnum for i in inside if i is not None)


def test_letter_rows_sum_the_codes_of_the_letter_said_and_those_ahead() -> None:
    letters, said = "ab 12", [None, 0, 0, 1, None, 3, 4]
    rows = letter_rows(letters, said, 16, 3)
    assert rows.shape == (1, 7, 16) and not rows[0, 0].any() and not rows[0, 4].any()
    code = letter_code
    torch.testing.assert_close(rows[0, 1], code("a", 0, 16) + code("b", 1, 16) + code(" ", 2, 16))
    torch.testing.assert_close(rows[0, 2], rows[0, 1])
    torch.testing.assert_close(rows[0, 6], code("2", 0, 16))  # nothing after the last letter
    assert not torch.allclose(code("a", 0, 16), code("a", 1, 16))  # the same letter ahead reads differently
    torch.testing.assert_close(letter_rows(letters, said, 16, 1)[0, 3], code("b", 0, 16))


def test_the_spelled_track_adds_each_codes_letters_scaled_to_the_tokens() -> None:
    """Step i reads code i + 1's token vector plus its letter vector at the size of the token vectors; silent
    codes read the token alone."""
    torch.manual_seed(0)
    rows = letter_rows("ab", [None, 0, 1, None, 1, 0], 6, 2)
    prompt, track = torch.randn(1, 3, 6), torch.randn(1, 4, 6)  # tokens 1..2, text end, pad
    counts = [2, 2, 2]
    plain = paced_inputs(TalkerInputs(prompt, torch.zeros(3, 1, 3, dtype=torch.long), track), counts)
    spelled = paced_inputs(TalkerInputs(prompt, torch.zeros(3, 1, 3, dtype=torch.long), track), counts, rows)
    size = torch.cat([prompt[:, -1:], track[:, :2]], 1).pow(2).mean().sqrt()
    for step in range(5):
        letter = rows[0, step + 1]
        expected = letter / letter.pow(2).mean().sqrt() * size if letter.any() else torch.zeros(6)
        torch.testing.assert_close(spelled.reply[0, step] - plain.reply[0, step], expected)
    torch.testing.assert_close(spelled.reply[0, 5:], plain.reply[0, 5:])
