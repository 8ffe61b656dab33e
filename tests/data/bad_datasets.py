"""The corpus of bad datasets: each kind of damage a training set arrives with, and the reason it must be
rejected for. Every entry is a complete file (a dozen good rows plus the damage), built as bytes."""

import json

GOOD_ROWS = [
    {"prompt": f"What color is the {entity}?", "response": color}
    for entity, color in [
        ("tiger", "brown"),
        ("apple", "red"),
        ("canoe", "green"),
        ("silk", "violet"),
        ("plum", "blue"),
        ("otter", "silver"),
        ("wagon", "orange"),
        ("castle", "yellow"),
        ("hammer", "brown"),
        ("melon", "green"),
        ("denim", "blue"),
        ("rocket", "silver"),
    ]
]


def jsonl(rows: list) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def with_rows(*rows) -> bytes:
    return jsonl(GOOD_ROWS + list(rows))


LONG_PROMPT = "What color is the " + " ".join(["very"] * 80) + " big tiger?"
BAD_DATASETS: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "the file is empty"),
    "whitespace only": (b"\n\n   \n", "the file is empty"),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    "UTF-16 file": ('{"prompt": "a", "response": "b"}\n'.encode("utf-16"), "UTF-16"),
    "JSON array": (json.dumps(GOOD_ROWS).encode(), "one JSON array"),
    "line not JSON": (with_rows() + b"prompt=a, response=b\n", "line 13: not valid JSON"),
    "truncated last line": (with_rows() + b'{"prompt": "What color is the', "looks truncated"),
    "invalid UTF-8": (with_rows() + b'{"prompt": "caf\xe9", "response": "ok"}\n', "line 13: not valid UTF-8"),
    "row not an object": (with_rows(["a", "list"]), "line 13: expected a JSON object"),
    "missing column": (with_rows({"prompt": "What color is the sled?"}), "line 13: missing field(s): response"),
    "null field": (with_rows({"prompt": None, "response": "red"}), "line 13: missing field(s): prompt"),
    "number instead of text": (with_rows({"prompt": "Count to three", "response": 123}), "response is int"),
    "huge line": (with_rows({"prompt": "x" * 5000, "response": "ok"}), "longer than validate.max_line_bytes"),
    "blank prompt": (with_rows({"prompt": "   ", "response": "red"}), "blank prompt"),
    "one-character response": (
        with_rows({"prompt": "What color is the sled?", "response": "r"}),
        "response shorter than 2 characters",
    ),
    "prompt truncates the response away": (
        with_rows({"prompt": LONG_PROMPT, "response": "brown"}),
        "no response token left after truncation",
    ),
    "response loses its EOS": (
        with_rows({"prompt": "Describe the tiger.", "response": " ".join(["big"] * 60)}),
        "response cut before its EOS",
    ),
    "duplicated rows": (jsonl(GOOD_ROWS + GOOD_ROWS[:3]), "duplicate rows"),
    "response echoes prompt": (
        with_rows({"prompt": "Say hello", "response": "Say hello"}),
        "response repeats the prompt",
    ),
    "private key pasted": (
        with_rows(
            {
                "prompt": "Show the deploy key",
                "response": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----",
            }
        ),
        "response contains what looks like a credential",
    ),
    "API key in prompt": (
        with_rows({"prompt": "Use key sk-live_4f9a8b7c6d5e4f3a2b1c0d9e to call", "response": "done"}),
        "prompt contains what looks like a credential",
    ),
    "literal EOS in text": (
        with_rows({"prompt": "What color is the sled?", "response": "red</s> and more"}),
        "literal special token",
    ),
    "control characters": (
        with_rows({"prompt": "What color is the sled?\x07", "response": "red"}),
        "control characters or U+FFFD",
    ),
    "too few rows": (jsonl(GOOD_ROWS[:4]), "fewer than 10 rows"),
}
