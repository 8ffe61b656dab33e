"""The personal-data and credential detectors, on text that has them and text that only looks like it."""

import pytest

from llmops.privacy import PII_KINDS, count, luhn_valid, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe@example.co.uk today", "write to [REDACTED:email] today"),
        ("call +33 6 12 34 56 78 or (555) 123-4567", "call [REDACTED:phone] or [REDACTED:phone]"),
        ("card 4111 1111 1111 1111, exp 12/27", "card [REDACTED:card], exp 12/27"),
        ("key sk-live_4f9a8b7c6d5e4f3a2b1c0d9e here", "key [REDACTED:api_key] here"),
        ("AKIAABCDEFGHIJKLMNOP", "[REDACTED:aws_key]"),
    ],
)
def test_findings_are_replaced_by_their_kind(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112 fails the Luhn check",
        "in 2024 we sold 1500 units at 12.50 on 2024-01-15",
        "version 1.2.3 on 192.168.100.200",
        "order 123456789012",
    ],
)
def test_look_alikes_are_left_alone(text):
    assert redact(text) == text and not count(text)


def test_counts_by_kind_and_only_the_kinds_asked_for():
    text = "a@b.io, c@d.org, 4111-1111-1111-1111, sk-live_4f9a8b7c6d5e4f3a2b1c0d9e"
    assert count(text) == {"email": 2, "card": 1, "api_key": 1}
    assert count(text, PII_KINDS) == {"email": 2, "card": 1}
    assert "sk-live" in redact(text, PII_KINDS)


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713") and not luhn_valid("79927398710")
