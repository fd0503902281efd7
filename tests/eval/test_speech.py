"""The speech judge: text normalisation, word error rate, pronunciations, and the recogniser's floor on
espeak-ng's own speech of the biography domain (low) against noise (high)."""

from __future__ import annotations

import random
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnilm.data.synth import media
from omnilm.eval.speech import (
    SpeechJudge,
    arpabet_from_espeak,
    cmu_dictionary,
    dictionary_pronunciations,
    edit_distance,
    espeak_pronunciations,
    normalise,
    number_words,
    pronunciations,
    spoken_words,
    tokens,
    wer,
    word_error_rate,
)

needs_espeak = pytest.mark.skipif(not media.espeak_available(), reason="espeak-ng is not installed")


def test_tokens_and_normalise() -> None:
    assert tokens("Megan Chang works for Smith-Lee, Inc.") == ["megan", "chang", "works", "for", "smith", "lee", "inc"]
    assert tokens("Megan Chang\u2019s office; 1,000 desks.") == ["megan", "chang's", "office", "1000", "desks"]
    assert normalise("Megan Chang was born on 6 December 1986.") == \
        normalise("megan chang was born on six december nineteen hundred and eighty six") == \
        ["megan", "chang", "was", "born", "on", "6", "december", "1986"]
    assert normalise("twenty three thirty") == ["23", "30"]  # a tens word cannot follow a unit: two numbers
    assert normalise("six seven") == ["6", "7"]
    assert normalise("one hundred and five and ten") == ["105", "and", "10"]
    assert normalise("Jones and Moore") == ["jones", "and", "moore"]
    assert normalise("agent 007") == normalise("agent zero zero seven") == ["agent", "0", "0", "7"]


def test_number_words_read_as_espeak_does() -> None:
    assert number_words("1986") == ["nineteen", "hundred", "eighty", "six"]
    assert number_words("1986", british=True) == ["nineteen", "hundred", "and", "eighty", "six"]
    assert number_words("1850") == ["one", "thousand", "eight", "hundred", "fifty"]
    assert number_words("2005", british=True) == ["two", "thousand", "and", "five"]
    assert number_words("0") == ["zero"] and number_words("1900") == ["nineteen", "hundred"]
    assert spoken_words("Born 11 May.") == ["born", "eleven", "may"]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 10**12 - 1), british=st.booleans())
def test_number_words_normalise_back_to_digits(n: int, british: bool) -> None:
    assert normalise(" ".join(number_words(str(n), british))) == [str(n)]


@cache
def _reference_distance(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """Levenshtein by its recursive definition."""
    if not a or not b:
        return len(a) + len(b)
    return min(_reference_distance(a[1:], b) + 1, _reference_distance(a, b[1:]) + 1,
               _reference_distance(a[1:], b[1:]) + (a[0] != b[0]))


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.sampled_from("abc"), max_size=7), b=st.lists(st.sampled_from("abc"), max_size=7))
def test_edit_distance_equals_the_recursive_definition(a: list[str], b: list[str]) -> None:
    assert edit_distance(a, b) == _reference_distance(tuple(a), tuple(b)) == edit_distance(b, a)


def test_word_error_rate() -> None:
    assert word_error_rate("Megan Chang was born in Denver.", "megan chang was born in denver") == 0.0
    assert word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert word_error_rate("a b", "a b c d") == 1.0  # insertions can take it past the reference's length
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "hello") == 1.0
    # Corpus WER weighs by reference length: 1 error in 1 word plus 0 in 9 is 0.1, not the mean 0.5.
    assert wer(["a", "b c d e f g h i j"], ["x", "b c d e f g h i j"]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        wer(["a"], [])


def test_dictionary_pronunciations() -> None:
    was = dictionary_pronunciations("was")
    assert was == cmu_dictionary()["was"] and len(was) > 1  # every variant
    town, eric = dictionary_pronunciations("town")[0], dictionary_pronunciations("eric")[0]
    assert dictionary_pronunciations("erictown") == (f"{eric} {town}",)  # a compound of dictionary words
    assert dictionary_pronunciations("chang's") == (f"{dictionary_pronunciations('chang')[0]} Z",)
    assert dictionary_pronunciations("jones's")[0].endswith("IH Z")  # after a sibilant
    assert dictionary_pronunciations("zzxqv") == ()
    assert pronunciations(["was", "zzxqv"], espeak_accents=()) == {"was": was, "zzxqv": ()}
    assert arpabet_from_espeak("m'IkeIl@") == "M IH K EY L AH"
    assert arpabet_from_espeak("b'V?n-") == "B AH T AH N"
    assert arpabet_from_espeak("tS'3:tS") == "CH ER CH"
    assert arpabet_from_espeak("k'\u00e7") is None  # no ARPAbet phone for it


@needs_espeak
def test_espeak_readings_complete_the_dictionary() -> None:
    words = ["mikayla", "brucefurt", "was", "of", "the"]
    readings = espeak_pronunciations(words)
    assert readings["mikayla"] == "M IH K EY L AH" and all(readings[w] for w in words)  # one run, one line per word
    prons = pronunciations(words)
    assert prons["mikayla"] == ("M IH K EY L AH",)
    assert prons["was"][:len(cmu_dictionary()["was"])] == cmu_dictionary()["was"]  # the dictionary's come first
    sentences = ["Mikayla works at Brucefurt.", "Zzxqv is here."]
    dictionary_only = SpeechJudge(sentences, espeak_accents=())
    assert dictionary_only.missing_words == ("brucefurt", "mikayla", "zzxqv")  # "furt" is no dictionary word
    assert "works" in dictionary_only.vocabulary and "mikayla" not in dictionary_only.vocabulary
    assert SpeechJudge(sentences).missing_words == ()  # espeak-ng even spells out "zzxqv"


def bios_sentences(people: int = 5, seed: int = 0) -> list[str]:
    """One sentence per attribute for each person of ``omnilm data synth bios``, templates drawn at random."""
    from omnilm.data.synth.bios import ATTRIBUTES, BiosConfig, make_people, sentence
    from omnilm.data.synth.templates import TEMPLATES

    rng = random.Random(seed)
    return [sentence(rng.choice(TEMPLATES[a]), p.name, p.attributes[a])[0]
            for p in make_people(BiosConfig(people=people, seed=seed)) for a in ATTRIBUTES]


#: Upper bound on the judge's corpus WER of espeak-ng's own speech here (measured: see the test's output).
FLOOR_WER = 0.15


@needs_espeak
def test_floor_on_espeak_speech_is_low_and_noise_is_high() -> None:
    from omnilm.data.synth.omni import OmniConfig, make_voices

    sentences = bios_sentences()
    assert len(sentences) == 30
    judge = SpeechJudge(sentences)
    assert judge.missing_words == ()
    # Three training and three evaluation voices of the omni synth (accents and variants differ), in turn.
    voices = make_voices(OmniConfig())
    speakers = voices["train"][:3] + voices["eval"][:3]
    waves = [media.speak(text, speakers[i % len(speakers)]) for i, text in enumerate(sentences)]
    floor, hypotheses = judge.score(waves, sentences)
    print(f"\nfloor WER of espeak-ng speech, {len(sentences)} sentences, {len(speakers)} voices: {floor:.3f}")
    for text, hyp in zip(sentences, hypotheses, strict=True):
        if word_error_rate(text, hyp):
            print(f"  {text!r} heard as {hyp!r}")
    assert floor <= FLOOR_WER
    assert judge.transcribe(waves[0]) == hypotheses[0]  # the noise floor is seeded: same audio, same words

    rng = np.random.default_rng(0)
    noises = [0.3 * rng.standard_normal(len(w)) for w in waves[:6]]
    noise_wer = judge.score(noises, sentences[:6])[0]
    print(f"WER of white noise against the same sentences: {noise_wer:.3f}")
    assert noise_wer >= 0.8


@needs_espeak
def test_codec_round_trip_stays_intelligible() -> None:
    """The ceiling of a talker that predicts codec codes: espeak-ng speech → codes → log-mel → Griffin–Lim."""
    import torch

    from omnilm.data.synth.omni import OmniConfig, make_voices
    from omnilm.omni.audio import log_mel_spectrogram
    from omnilm.omni.codec import fit_codec
    from omnilm.omni.vocoder import griffin_lim

    pool = bios_sentences(people=15)
    measured, fitting = pool[:12], pool[30:]  # the codec never hears the measured sentences
    speakers = make_voices(OmniConfig())["train"][:3]
    codec = fit_codec([media.speak(text, speakers[i % 3]) for i, text in enumerate(fitting)], codes=256, seed=0)
    judge = SpeechJudge(pool[:30])
    waves = [media.speak(text, speakers[i % 3]) for i, text in enumerate(measured)]
    round_trips = []
    for wave in waves:
        log_mel = log_mel_spectrogram(torch.from_numpy(wave.astype(np.float32)))  # (128, frames)
        decoded = codec.decode(codec.encode(log_mel))[:, :log_mel.shape[1]]
        round_trips.append(griffin_lim(decoded, iterations=64).clamp(-1.0, 1.0).numpy())
    floor = judge.score(waves, measured)[0]
    ceiling = judge.score(round_trips, measured)[0]
    print(f"\n{len(measured)} sentences, {len(speakers)} voices: floor WER {floor:.3f}, codec K=256 + Griffin-Lim "
          f"{ceiling:.3f}")
    assert ceiling <= floor + 0.15
