import pytest

from llmops.privacy import redact


@pytest.mark.parametrize(
    ("text", "kind", "secret"),
    [
        ("write to ann.lee+x@mail.example.co.uk today", "email", "ann.lee"),
        ("call +1 (555) 123-4567 now", "phone", "123-4567"),
        ("or +44 20 7946 0958", "phone", "7946"),
        ("card 4111 1111 1111 1111 exp 12/29", "card", "4111"),
        ("card 4111-1111-1111-1111", "card", "4111"),
        ("key AKIAABCDEFGHIJKLMNOP", "aws_access_key", "AKIA"),
        ("token sk-abcdefghijklmnopqrstuvwx", "api_key", "sk-abc"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "private_key", "MIIEow"),
    ],
)
def test_personal_data_and_credentials_are_redacted(text, kind, secret):
    redacted = redact(text)
    assert f"[REDACTED:{kind}]" in redacted and secret not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "The tiger is orange and 12 years old.",
        "released 2026-11-30, version 1.2.3, host 192.168.1.10",
        "card 4111 1111 1111 1112 fails the Luhn check",
        "order number 1234 5678",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text
