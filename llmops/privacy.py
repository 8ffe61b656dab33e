"""Personal data and credentials in text: find them, count them by kind, replace them.

One home for the detectors, shared by data validation (which redacts or refuses personal data and always
refuses credentials) and the server's traffic log (which redacts both). Nothing leaves the machine to be
checked: regular expressions for credentials, e-mail addresses and cards, and Google's libphonenumber
(`phonenumbers`) for phone numbers, which knows each country's numbering plan, so timestamps, IP ranges,
amounts and ids are not mistaken for phones just because they are runs of digits.

Every detector runs in time linear in the text: no pattern can backtrack over what an earlier attempt
already scanned (each may only start where a run of its characters starts, and what follows a repeated part
cannot be taken by it), and the phone matcher only ever sees short windows around runs of digits, so a
megabyte of adversarial input costs what a megabyte of prose does (`bench/redaction.py` measures it).
"""

from __future__ import annotations

import bisect
import functools
import re
from collections import Counter
from collections.abc import Iterable

import phonenumbers

# Credentials: a pasted secret is a defect in training data wherever it appears (the model memorises it).
SECRET_PATTERNS = {
    "private key block": r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----",
    "AWS access key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36,}",
    "OpenAI-style API key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}",
    # Starts only where a run of token characters starts: with `\b`, `eyJ-eyJ-eyJ-...` would be rescanned from
    # every `eyJ` (quadratic).
    "JSON web token": r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
}
_CREDENTIALS = {
    "private_key": re.compile(SECRET_PATTERNS["private key block"]),
    "aws_key": re.compile(SECRET_PATTERNS["AWS access key"]),
    "github_token": re.compile(SECRET_PATTERNS["GitHub token"]),
    "api_key": re.compile(SECRET_PATTERNS["OpenAI-style API key"]),
    "slack_token": re.compile(SECRET_PATTERNS["Slack token"]),
    "google_api_key": re.compile(SECRET_PATTERNS["Google API key"]),
    "jwt": re.compile(SECRET_PATTERNS["JSON web token"]),
}
_PRIVATE_KEY_END = re.compile(r"-----END [A-Z ]{0,40}PRIVATE KEY-----")
CREDENTIAL_KINDS = tuple(_CREDENTIALS)

# An address starts only where a run of address characters starts (the lookbehind): tried from every
# position, `a.a.a.a...` without an `@` cost time growing with the square of its length. Leading dots are not
# part of it. Domain labels cannot hold a dot, so the domain is split one way only. Letters are Latin ones
# (accents included, as in `müller@beispiel.de`): Japanese or Chinese text runs straight into an address.
_LETTERS = r"A-Za-z0-9\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
_EMAIL = re.compile(
    rf"(?<![{_LETTERS}_.%+-])\.*(?P<address>[{_LETTERS}_%+-][{_LETTERS}_.%+-]*@[{_LETTERS}_-]+"
    rf"(?:\.[{_LETTERS}_-]+)*\.[A-Za-z]{{2,}})(?![{_LETTERS}_])"
)
# `git@github.com:org/repo.git` is an scp-style remote, `logo@2x.png` an image at twice the resolution.
_NOT_AN_ADDRESS = re.compile(r":[\w~/.-]|@\d+(?:\.\d+)?x\.")

# Card numbers: 13 to 19 digits, optionally grouped by spaces or dashes, that pass the Luhn check.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")

# Phone numbers. A number written without its country code (`0612345678`, `(415) 555-2671`) is only a number
# in some country's plan, so the matcher tries each of these regions; one written with it (`+33 ...`,
# `0033 ...`) is found whichever region is tried. The default covers the largest markets of the languages chat
# exports come in (English: US, GB, IN; German, French, Brazilian Portuguese, Japanese): each region added
# finds that country's national formats, and costs one more pass over the digit runs and some precision (a
# digit string valid somewhere is more likely the more plans it is checked against).
PHONE_REGIONS = ("US", "GB", "IN", "DE", "FR", "BR", "JP")
# VALID: the digits form a number that the country actually assigns (right length, existing prefix), and the
# candidate is not glued to letters, a currency sign or `%`; libphonenumber also skips dates and timestamps.
# Grouping is not required to match the country's usual style (STRICT_GROUPING): people write `+33 612 345
# 678` and `+91 987 654 3210` too.
PHONE_LENIENCY = phonenumbers.Leniency.VALID
# A run of the characters numbers are written with, starting at a digit or an opening `+`/`(`. Dates, IPv4
# addresses and decimals inside a run are cut out of it (they are never part of a phone number, and would cost
# the matcher most of its time in logs); what is left, if it has enough digits for any phone number, is handed
# to the matcher with a few characters of context each side (it looks at the characters around a candidate,
# and at a timestamp's `:ss` after it).
_PHONE_RUN = re.compile(r"[+＋(（\[]?\d[\d+＋()（）\[\]\-‐‑‒–—―−ー－/／.．  \t\u00a0\u2009\u202f\u3000]*")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\d)")
_NOT_A_PHONE = re.compile(
    rf"{_IPV4.pattern}(?:-{_OCTET}(?:\.{_OCTET}){{0,3}})?(?:/\d{{1,2}})?"  # an address, range or network
    r"|(?<!\d)(?:19|20)\d\d([-/.])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12]\d|3[01])(?!\d|[-/.]\d)"  # 2023-01-13
    r"|(?<!\d)(?:0?[1-9]|[12]\d|3[01])([-/.])(?:0?[1-9]|1[0-2])\2(?:19|20)\d\d(?!\d|[-/.]\d)"  # 13.01.2023
    r"|(?<![\d.])(?:0|[1-9]\d*)\.\d+(?!\d|\.\d)"  # 3.14159 (not 030.1234567, not 212.555.0123)
)
_PHONE_MIN_DIGITS = 7  # no number of these regions, written with its area code, has fewer
_PHONE_CONTEXT = 8
# Long runs (a table of numbers) are cut into overlapping chunks: the matcher gives up on a text after 65,535
# invalid candidates, and slices the rest of its text for every timestamp-like one; a chunk bounds both. The
# overlap is twice as long as any written phone number, so each lies whole in the chunk that keeps it.
_PHONE_CHUNK = 2048
_PHONE_OVERLAP = 64

PII_KINDS = ("email", "card", "phone")
KINDS = CREDENTIAL_KINDS + PII_KINDS


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries (it tells a card from any 16-digit number)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _is_card(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _private_keys(text: str) -> list[tuple[int, int]]:
    """Each key block from its BEGIN line to the next END line (or the BEGIN line alone when there is none).
    The END lines are found once, not searched for again from every BEGIN."""
    ends = [m.end() for m in _PRIVATE_KEY_END.finditer(text)]
    found = []
    for begin in _CREDENTIALS["private_key"].finditer(text):
        after = bisect.bisect_left(ends, begin.end() + 1)
        found.append((begin.start(), ends[after] if after < len(ends) else begin.end()))
    return found


def _emails(text: str) -> list[tuple[int, int]]:
    return [
        (m.start("address"), m.end("address"))
        for m in _EMAIL.finditer(text)
        if not _NOT_AN_ADDRESS.match(text, m.end("address")) and not _NOT_AN_ADDRESS.search(m.group("address"))
    ]


def _phone_stretches(text: str) -> list[tuple[int, int, int, int]]:
    """The stretches of `text` the phone matcher reads (with some context): runs of digits and phone
    punctuation less dates, IPv4 addresses and decimals, with enough digits, long ones cut into overlapping
    chunks. Their total length is at most a little more than the text's, whatever the text.

    Each comes as (start, end, keep_from, keep_to): a number found in it counts only if it starts in
    [keep_from, keep_to), so each number belongs to one chunk, and one read from a chunk cut through a
    number (its first digits missing) is left to the chunk before, which holds it whole."""
    stretches = []
    half = _PHONE_OVERLAP // 2
    for run in _PHONE_RUN.finditer(text):
        start, pieces = run.start(), []
        for other in _NOT_A_PHONE.finditer(text, run.start(), run.end()):
            pieces.append((start, other.start()))
            start = other.end()
        pieces.append((start, run.end()))
        for start, end in pieces:
            if sum(map(str.isdigit, text[start:end])) < _PHONE_MIN_DIGITS:
                continue
            chunks = range(start, max(start + 1, end - _PHONE_OVERLAP), _PHONE_CHUNK - _PHONE_OVERLAP)
            for chunk in chunks:
                last = chunk == chunks[-1]
                keep_from = chunk + half if chunk > start else 0
                keep_to = len(text) if last else chunk + _PHONE_CHUNK - half
                stretches.append((chunk, end if last else chunk + _PHONE_CHUNK, keep_from, keep_to))
    return stretches


@functools.lru_cache(maxsize=4096)  # the same numbers and lines recur (duplicates, repeated log lines)
def _window_phones(window: str, regions: tuple[str, ...]) -> list[tuple[int, int]]:
    found = set()
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(window, region, leniency=PHONE_LENIENCY):
            if not _part_of_something_else(window, match.start, match.end):
                found.add((match.start, match.end))
    return sorted(found)


def _part_of_something_else(text: str, start: int, end: int) -> bool:
    """A valid-looking number inside a decimal (`3.14159265358`), a time, a path (`/users/1234567890`), an IPv4
    address or range, or a reference (`#2023-000123`)."""
    before, after = text[max(0, start - 2) : start], text[end : end + 2]
    if len(before) == 2 and before[1] in ".,:" and before[0].isdigit() or before[-1:] == "#":
        return True
    if len(after) == 2 and after[0] in ".,:" and after[1].isdigit():
        return True
    if before[-1:] == "/" and (before[:1].isalnum() or before[:1] == "/") or after[:1] == "/" and after[1:].isalnum():
        return True
    return any(ip.start() < end and start < ip.end() for ip in _IPV4.finditer(text))


def _phones(text: str, regions: Iterable[str], taken: bytearray) -> list[tuple[int, int]]:
    regions = tuple(regions)
    found = []
    for start, end, keep_from, keep_to in _phone_stretches(text):
        if taken.find(0, start, end) < 0:
            continue  # all of it is already a card
        low, high = max(0, start - _PHONE_CONTEXT), min(len(text), end + _PHONE_CONTEXT)
        found += [
            (low + a, low + b) for a, b in _window_phones(text[low:high], regions) if keep_from <= low + a < keep_to
        ]
    return _union(sorted(set(found)))


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping spans (one number read differently by two regions, or found in two chunks) merged."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _matches(text: str, kinds: Iterable[str], regions: Iterable[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans, earlier kinds in KINDS winning overlaps."""
    spans: list[tuple[int, int, str]] = []
    taken = bytearray(len(text))  # 1 where an earlier kind already found something
    wanted = set(kinds)
    # Cheap bounds before the scans: an address needs an `@`, a card number 13 digits, a phone number
    # _PHONE_MIN_DIGITS. Digits are counted in C for ASCII text; other text may hold other scripts' digits
    # (`\d` matches them), so its length stands in, which skips nothing.
    digits = sum(map(text.count, "0123456789")) if text.isascii() else len(text)
    if "@" not in text:
        wanted.discard("email")
    if digits < 13:
        wanted.discard("card")
    if digits < _PHONE_MIN_DIGITS:
        wanted.discard("phone")
    for kind in [k for k in KINDS if k in wanted]:
        if kind == "private_key":
            found = _private_keys(text)
        elif kind in _CREDENTIALS:
            found = [m.span() for m in _CREDENTIALS[kind].finditer(text)]
        elif kind == "email":
            found = _emails(text)
        elif kind == "card":
            found = [m.span() for m in _CARD.finditer(text) if _is_card(m.group())]
        else:
            found = _phones(text, regions, taken)
        for start, end in found:
            if taken.find(1, start, end) < 0:
                taken[start:end] = b"\x01" * (end - start)
                spans.append((start, end, kind))
    return sorted(spans)


def count(text: str, kinds: Iterable[str] = KINDS, regions: Iterable[str] = PHONE_REGIONS) -> Counter[str]:
    """How many findings of each kind `text` holds (phone numbers in national format: of `regions`)."""
    return Counter(kind for _, _, kind in _matches(text, kinds, regions))


def redact(text: str, kinds: Iterable[str] = KINDS, regions: Iterable[str] = PHONE_REGIONS) -> str:
    """`text` with each finding replaced by `[REDACTED:<kind>]` (kinds: see KINDS)."""
    out, last = [], 0
    for start, end, kind in _matches(text, kinds, regions):
        out += [text[last:start], f"[REDACTED:{kind}]"]
        last = end
    return "".join(out) + text[last:]
