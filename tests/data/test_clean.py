import unicodedata

import pytest

from omnilm.data.clean import normalize_text, scrub_pii


def test_normalize_composes_unicode_and_cleans_whitespace():
    decomposed = "cafe\u0301"  # e + combining acute accent
    text = f"  {decomposed}  au\tlait \u00a0 \r\nline two   \n \n\n\n\nthird\t \n"
    assert normalize_text(text) == "café au lait\nline two\n\nthird"
    assert unicodedata.is_normalized("NFC", normalize_text(text))


def test_normalize_keeps_one_blank_line_between_paragraphs():
    assert normalize_text("a\n\nb") == "a\n\nb"
    assert normalize_text("a\n\n\nb") == "a\n\nb"
    assert normalize_text("a\nb") == "a\nb"


@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("Write to alice.moreau+news@mail.example.co.uk today.", "email", "Write to <EMAIL> today."),
    ("Call +33 6 12 34 56 78 now.", "phone", "Call <PHONE> now."),
    ("Call (555) 123-4567 now.", "phone", "Call <PHONE> now."),
    ("Call 555-123-4567 2 times.", "phone", "Call <PHONE> 2 times."),
    ("Call 020 7946 0958.", "phone", "Call <PHONE>."),
    ("Call 1-800-555-1234.", "phone", "Call <PHONE>."),
    ("Server 192.168.10.20 is down.", "ip", "Server <IP> is down."),
    ("Host 2001:db8::8a2e:370:7334 and ::1.", "ip", "Host <IP> and <IP>."),
    ("Mapped ::ffff:192.0.2.1 here", "ip", "Mapped <IP> here"),
])
def test_each_kind_of_pii_is_replaced_and_counted(text, kind, expected):
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == expected
    assert counts[kind] == expected.count(f"<{kind.upper()}>")
    assert sum(counts.values()) == counts[kind]


@pytest.mark.parametrize("text", [
    "Alice Moreau was born on 1961-03-03 in Lyon.",
    "She was born on 12/03/1961 and 3.3.1961, in the 1960s, in 1961.",
    "He counted 12345 sheep, 1 234 567 stars and 1,234,567 grains.",
    "In 2019 250 students enrolled; the war lasted 1939-1945; see 1961 1962 1963.",
    "Pi is 3.14159 and the meeting is at 12:30:45; C++ uses std::vector.",
    "ISBN 978-3-16-148410-0 and version 1.2.3 are not addresses.",
])
def test_dates_years_and_plain_numbers_are_kept(text):
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == text
    assert sum(counts.values()) == 0


def test_invalid_addresses_are_kept():
    text = "Not an address: 999.1.1.1 or 1.2.3 or a::b::c."
    assert scrub_pii(text)[0] == text
