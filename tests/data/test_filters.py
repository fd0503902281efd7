import pytest

from omnilm.config import ConfigError, from_dict
from omnilm.data import filters
from omnilm.data.filters import Doc, QualityThresholds, failed_rule, rule_names

BIO = "Alice Moreau was born on 3 March 1961 in Lyon. She studied physics at Grenoble."
PROSE = (
    "The river runs past the old mill before it reaches the harbour town.\n"
    "Fishermen there still mend their nets by hand, although most boats now carry engines.\n"
    "In summer the quay fills with visitors who come for the market and the music festival.\n"
    "Winter is quieter: storms close the road for days, and the school bus waits at the bridge."
)
DEFAULT = QualityThresholds()

# rule -> (a document it must remove, thresholds to use); each document is built to fail that rule.
FAILING = {
    "min_words": ("Too short here.", DEFAULT),
    "max_words": (" ".join(f"word{i % 97}" for i in range(100_001)), DEFAULT),
    "symbol_word_ratio": ("#news #sports #daily #love #fun follow our page for more posts", DEFAULT),
    "mean_word_length": ("a b c d e f g h i j k l", DEFAULT),
    "alphabetic_words": ("Totals 10 20 30 40 50 60 70 80 90 100 were recorded", DEFAULT),
    "bullet_lines": ("• Home page\n• About us\n• Contact form\n• Our blog\n• The shop", DEFAULT),
    "ellipsis_lines": ("Read more about the harbour...\nThe best recipes for winter…\n"
                       "Click here to see the photos…\nThe market opens at nine on Sundays.", DEFAULT),
    "duplicate_lines": (PROSE + "\nShare\nShare\nShare\nShare\nShare", DEFAULT),
    "duplicate_line_chars": ("The same long sentence about the harbour town and its boats is here.\nShort one.\n"
                             "Another short.\nThe same long sentence about the harbour town and its boats is here.",
                             DEFAULT),
}


@pytest.mark.parametrize("name", sorted(FAILING))
def test_each_rule_removes_its_document_and_keeps_clean_prose(name):
    text, thresholds = FAILING[name]
    rule = getattr(filters, name)
    assert rule(Doc(text), thresholds) == name
    assert rule(Doc(PROSE), thresholds) is None
    assert rule(Doc(BIO), thresholds) is None


def test_rules_work_as_the_first_failure_in_the_pipeline():
    for name in ("min_words", "symbol_word_ratio", "mean_word_length", "alphabetic_words", "bullet_lines",
                 "ellipsis_lines", "duplicate_lines", "duplicate_line_chars"):
        assert failed_rule(FAILING[name][0], DEFAULT) == name


def test_long_words_fail_mean_word_length():
    text = "internationalisation counterrevolutionaries electroencephalographs disproportionately"
    assert failed_rule(text + " " + text.upper(), DEFAULT) == "mean_word_length"


@pytest.mark.parametrize("n", [2, 3, 4])
def test_top_ngram_removes_boilerplate_phrases(n):
    phrase = ["click", "here", "to", "subscribe"][:n]
    filler = ["the", "harbour", "town", "has", "boats", "nets", "markets", "music", "storms", "bridges", "schools"]
    words = []
    for word in filler:
        words += [*phrase, word]
    thresholds = QualityThresholds(max_top_ngram_fraction={n: DEFAULT.max_top_ngram_fraction[n]},
                                   max_duplicate_ngram_fraction={})
    assert filters.top_ngram(Doc(" ".join(words)), thresholds) == f"top_{n}gram"
    assert filters.top_ngram(Doc(PROSE), thresholds) is None
    assert failed_rule(PROSE, thresholds) is None


def test_duplicate_ngram_removes_repeated_passages_and_keeps_prose():
    passage = "the committee approved the new budget for the coastal road repairs next spring"
    text = f"{passage} although several members objected loudly. Later that week {passage} again."
    no_top = QualityThresholds(max_top_ngram_fraction={})
    assert filters.duplicate_ngram(Doc(text), no_top) == "duplicate_5gram"
    assert filters.duplicate_ngram(Doc(PROSE), no_top) is None
    assert failed_rule(text, no_top) == "duplicate_5gram"


def test_short_biography_passes_every_default_rule():
    assert failed_rule(BIO, DEFAULT) is None
    assert failed_rule(PROSE, DEFAULT) is None


def test_rule_names_cover_every_reported_name():
    names = rule_names(DEFAULT)
    assert {"top_2gram", "top_3gram", "top_4gram", "duplicate_5gram", "duplicate_10gram"} <= set(names)
    assert set(FAILING) <= set(names)
    assert len(names) == len(set(names))


def test_thresholds_load_from_json_keys_and_refuse_bad_values():
    loaded = from_dict(QualityThresholds, {"max_top_ngram_fraction": {"2": 0.5}, "min_words": 3})
    assert loaded.max_top_ngram_fraction == {2: 0.5} and loaded.min_words == 3
    with pytest.raises(ConfigError, match="max_duplicate_line_fraction"):
        QualityThresholds(max_duplicate_line_fraction=1.5)
    with pytest.raises(ConfigError, match="min_words"):
        QualityThresholds(min_words=10, max_words=5)
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(QualityThresholds, {"min_word": 3})
