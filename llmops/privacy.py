"""Personal data and credentials in text: find them, count them by kind, replace them.

One home for the detectors, shared by data validation (which redacts or refuses personal data and always
refuses credentials) and the server's traffic log (which redacts both). Plain regular expressions, no
third-party service: the data never leaves the machine to be checked.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# Credentials: a pasted secret is a defect in training data wherever it appears (the model memorises it).
SECRET_PATTERNS = {
    "private key block": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "AWS access key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36,}",
    "OpenAI-style API key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}",
    "JSON web token": r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
}
_CREDENTIALS = {
    "private_key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:.*?-----END [A-Z ]*PRIVATE KEY-----)?", re.DOTALL),
    "aws_key": re.compile(SECRET_PATTERNS["AWS access key"]),
    "github_token": re.compile(SECRET_PATTERNS["GitHub token"]),
    "api_key": re.compile(SECRET_PATTERNS["OpenAI-style API key"]),
    "slack_token": re.compile(SECRET_PATTERNS["Slack token"]),
    "google_api_key": re.compile(SECRET_PATTERNS["Google API key"]),
    "jwt": re.compile(SECRET_PATTERNS["JSON web token"]),
}
CREDENTIAL_KINDS = tuple(_CREDENTIALS)

# Personal data. Cards before phones: a card number would otherwise also read as a long phone number.
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,5}(?![\w-])")
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


def _is_phone(match: str) -> bool:
    # Separated groups, 9 to 15 digits (E.164's limit): years, amounts and counts are not phone numbers.
    digits = re.sub(r"\D", "", match)
    if re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", match):  # an IPv4 address
        return False
    return 9 <= len(digits) <= 15 and (match.startswith("+") or re.search(r"[ .()-]", match) is not None)


def _matches(text: str, kinds: Iterable[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans, earlier kinds in KINDS winning overlaps."""
    spans: list[tuple[int, int, str]] = []
    taken = [False] * len(text)
    for kind in [k for k in KINDS if k in set(kinds)]:
        if kind in _CREDENTIALS:
            found = [(m.start(), m.end()) for m in _CREDENTIALS[kind].finditer(text)]
        elif kind == "email":
            found = [(m.start(), m.end()) for m in _EMAIL.finditer(text)]
        elif kind == "card":
            found = [(m.start(), m.end()) for m in _CARD.finditer(text) if _is_card(m.group())]
        else:
            found = [(m.start(), m.end()) for m in _PHONE.finditer(text) if _is_phone(m.group())]
        for start, end in found:
            if not any(taken[start:end]):
                spans.append((start, end, kind))
                taken[start:end] = [True] * (end - start)
    return sorted(spans)


def count(text: str, kinds: Iterable[str] = KINDS) -> Counter[str]:
    """How many findings of each kind `text` holds."""
    return Counter(kind for _, _, kind in _matches(text, kinds))


def redact(text: str, kinds: Iterable[str] = KINDS) -> str:
    """`text` with each finding replaced by `[REDACTED:<kind>]` (kinds: see KINDS)."""
    out, last = [], 0
    for start, end, kind in _matches(text, kinds):
        out += [text[last:start], f"[REDACTED:{kind}]"]
        last = end
    return "".join(out) + text[last:]
