"""Personal data and credentials out of text before it is written anywhere: `redact(text)`.

Each credential, e-mail address, phone number and Luhn-valid card number becomes `[REDACTED:<kind>]`.
The credential patterns are those the validation suite rejects in training data (tasks/validate.py).
"""

from __future__ import annotations

import re

CREDENTIAL_PATTERNS = {
    # The whole block, not just its first line: the key material is what must not leak.
    "private_key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----)?",
    "aws_access_key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "github_token": r"\bgh[pousr]_[A-Za-z0-9]{36,}",
    "api_key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "slack_token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "google_api_key": r"\bAIza[0-9A-Za-z_-]{35}",
    "jwt": r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
}
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# 13 to 19 digits, optionally grouped by spaces or hyphens; kept only when the Luhn checksum holds.
CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# An optional +country code, an optional (area code), then digit groups joined by spaces or hyphens. Dots are
# not separators, so version numbers and IP addresses stay; 9 to 15 digits, so dates (8) stay too.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ -]?)?(?:\(\d{1,4}\)[ -]?)?\d{2,4}(?:[ -]\d{2,4}){1,4}(?![\w-])")


def redact(text: str) -> str:
    """`text` with credentials, e-mail addresses, phone numbers and card numbers replaced by `[REDACTED:<kind>]`."""
    for kind, pattern in CREDENTIAL_PATTERNS.items():
        text = re.sub(pattern, f"[REDACTED:{kind}]", text)
    text = CARD.sub(lambda m: "[REDACTED:card]" if _luhn_valid(m.group()) else m.group(), text)
    text = EMAIL.sub("[REDACTED:email]", text)
    return PHONE.sub(lambda m: "[REDACTED:phone]" if 9 <= _digit_count(m.group()) <= 15 else m.group(), text)


def _digit_count(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0
