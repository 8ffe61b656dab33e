"""The corpus of bad datasets: each kind of damage a training set arrives with, and the reason it must be
rejected for. Every entry is a complete file (a dozen good rows plus the damage), built as bytes.

Rows that cleaning drops (duplicates, short answers, over-long conversations, conversations whose turns cannot
train) fail a file only when more are dropped than `validate.max_dropped_ratio` allows: the corpus is judged
with a ratio of 0, so each still fails, and the report names the reason."""

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


SYSTEM_PROMPT = "Answer with one word."
GOOD_MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ]
    }
    for row in GOOD_ROWS
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
        "longer than finetune.max_seq_len",
    ),
    "response loses its EOS": (
        with_rows({"prompt": "Describe the tiger.", "response": " ".join(["big"] * 60)}),
        "longer than finetune.max_seq_len",
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
    # The other shapes, broken.
    "messages row without an assistant turn": (
        jsonl([*GOOD_MESSAGES, {"messages": [{"role": "user", "content": "What color is the sled?"}]}]),
        "no assistant turn: nothing to learn from",
    ),
    "messages row with an unknown role": (
        jsonl([*GOOD_MESSAGES, {"messages": [{"role": "user", "content": "Hi?"}, {"role": "bot", "content": "red"}]}]),
        "line 13: messages turn 2 has unknown role 'bot'",
    ),
    "messages content not a string": (
        jsonl(
            [
                *GOOD_MESSAGES,
                {"messages": [{"role": "user", "content": ["Hi?"]}, {"role": "assistant", "content": "red"}]},
            ]
        ),
        "content is list, must be a string",
    ),
    "conversation ending on a user turn": (
        jsonl([*GOOD_MESSAGES, {"messages": [*GOOD_MESSAGES[0]["messages"], {"role": "user", "content": "And?"}]}]),
        "ends on a user turn",
    ),
    "ShareGPT turn with an unknown speaker": (
        jsonl([{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "robot", "value": "red"}]}] * 12),
        "unknown from 'robot'",
    ),
    "Alpaca row without output": (
        jsonl([{"instruction": r["prompt"], "output": r["response"]} for r in GOOD_ROWS] + [{"instruction": "Hi?"}]),
        "line 13: missing field(s): output",
    ),
    "formats mixed in one file": (
        jsonl([*GOOD_MESSAGES, {"prompt": "What color is the sled?", "response": "red"}]),
        "line 13: a row in the prompt_response shape, but the file's format is messages",
    ),
    "row of no known shape": (with_rows({"question": "Hi?", "answer": "red"}), "no known shape"),
}
