"""Text normalisation and PII scrubbing, one document at a time.

Normalisation makes equal-looking texts equal byte for byte (Unicode NFC, one space between words, at most
one blank line between paragraphs), which also makes exact dedup meaningful. PII scrubbing replaces e-mail
addresses, phone numbers and IP addresses with the placeholders ``<EMAIL>``, ``<PHONE>`` and ``<IP>``.

The phone pattern is deliberately conservative: prose is full of digit groups that are not phone numbers
(dates such as ``1961-03-03``, years, amounts such as ``12345`` or ``1 234 567``), and replacing those would
destroy facts the model should learn. A false negative leaks a number; a false positive corrupts the data.
"""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata
from collections import Counter

EMAIL_TOKEN = "<EMAIL>"
PHONE_TOKEN = "<PHONE>"
IP_TOKEN = "<IP>"
PII_KINDS = ("email", "phone", "ip")

_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_SPACE_RUN = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# Other horizontal spaces (no-break, thin, ideographic...) count as spaces; line and paragraph separators
# as line breaks.
_ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\f\v]")
_ODD_BREAK = re.compile(r"\r\n?|[\u2028\u2029\x85]")


def normalize_text(text: str) -> str:
    """NFC, unified line breaks, no trailing spaces, single spaces, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", text)
    text = _ODD_BREAK.sub("\n", text)
    text = _ODD_SPACE.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _SPACE_RUN.sub(" ", text)
    # A line that held only spaces is now empty, so runs of such lines collapse too.
    text = text.replace("\n ", "\n")
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])")

# IPv6 candidates are found loosely and then validated by ``ipaddress``: a complete IPv6 grammar as a regex
# is long, and validation also rejects look-alikes such as times ``12:30:45``.
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})"
                             r"(?![\w:]|\.\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")

# A phone candidate: optional +country code, optional (area code), then 2 to 6 groups of digits separated by
# single spaces, dots or dashes, all but the first at least two digits long (so "555-1234 2 times" stops
# before the 2). ``_is_phone`` then decides.
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+.,/:-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,5}(?!\w|[.,/:-]\d)")
_DATE = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}|\d{1,2}([-./])\d{1,2}\2\d{2,4}")
_THOUSANDS = re.compile(r"\d{1,3}([ .,])\d{3}(?:\1\d{3})*")
MIN_PHONE_DIGITS = 7
MAX_PHONE_DIGITS = 15  # E.164


def _is_phone(candidate: str) -> bool:
    digits = sum(ch.isdigit() for ch in candidate)
    if not MIN_PHONE_DIGITS <= digits <= MAX_PHONE_DIGITS:
        return False
    if candidate.startswith("+") or "(" in candidate:
        return True
    if _DATE.fullmatch(candidate) or _THOUSANDS.fullmatch(candidate):
        return False
    groups = re.split(r"[ .-]", candidate)
    if all(len(g) == 4 and 1000 <= int(g) <= 2100 for g in groups):
        return False  # "1961-1970", "in 1961 1962 1963"
    # Two space-separated numbers are usually prose ("in 2019 250 students"); space-written phone numbers
    # have three groups or more ("020 7946 0958", "06 12 34 56 78").
    return " " not in candidate or len(groups) >= 3


def _ipv6_or_keep(match: re.Match[str], counts: Counter[str]) -> str:
    candidate = match.group(0)
    if not any(ch in string.hexdigits for ch in candidate):
        return candidate
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return candidate
    counts["ip"] += 1
    return IP_TOKEN


def _phone_or_keep(match: re.Match[str], counts: Counter[str]) -> str:
    candidate = match.group(0)
    if not _is_phone(candidate):
        return candidate
    counts["phone"] += 1
    return PHONE_TOKEN


def scrub_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace e-mails, IP addresses and phone numbers; return the text and the replacements per kind.

    E-mails go first so that digits inside an address are not taken for a phone number, and IP addresses
    before phone numbers so that ``192.168.10.20`` is one address, not digit groups.
    """
    counts: Counter[str] = Counter()
    # Cheap guards skip the regexes for texts that cannot hold the pattern (most of them, for e-mail and IPv6).
    if "@" in text:
        text, n = _EMAIL.subn(EMAIL_TOKEN, text)
        counts["email"] += n
    if ":" in text:
        text = _IPV6_CANDIDATE.sub(lambda m: _ipv6_or_keep(m, counts), text)
    if "." in text:
        text, n = _IPV4.subn(IP_TOKEN, text)
        counts["ip"] += n
    text = _PHONE_CANDIDATE.sub(lambda m: _phone_or_keep(m, counts), text)
    return text, counts
