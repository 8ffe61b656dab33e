"""Every accepted row shape becomes the same conversation; files of one shape each, BOM and CRLF accepted."""

import json

import pytest

from llmops.data import Conversation, Turn, parse_jsonl, read_conversations, write_jsonl
from llmops.errors import LLMOpsError

SYSTEM = {"role": "system", "content": "Answer with one word."}
ROWS = {
    "messages": {"messages": [SYSTEM, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "Answer with one word."},
            {"from": "human", "value": "Q?"},
            {"from": "gpt", "value": "A"},
        ]
    },
    "prompt_response": {"prompt": "Q?", "response": "A"},
    "prompt_completion": {"prompt": "Q?", "completion": "A"},
    "alpaca": {"instruction": "Q?", "input": "", "output": "A"},
}


def write(path, rows, newline="\n", bom=False):
    text = newline.join(json.dumps(row) for row in rows) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@pytest.mark.parametrize("shape", list(ROWS))
def test_each_shape_is_detected_and_read_as_a_conversation(tmp_path, shape):
    row = {**ROWS[shape], "id": 7, "model_version": "3"}  # extra keys (served traffic) are ignored
    parsed = parse_jsonl(write(tmp_path / "d.jsonl", [row, row]))
    assert parsed.format == shape and not parsed.problems
    [(line, conversation), _] = parsed.rows
    assert line == 1
    question_and_answer = (Turn("user", "Q?"), Turn("assistant", "A"))
    assert conversation.turns[-2:] == question_and_answer
    assert conversation.prompt[-1] == Turn("user", "Q?") and conversation.reference == "A"


def test_alpaca_input_joins_the_instruction(tmp_path):
    row = {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"}
    [conversation] = read_conversations(write(tmp_path / "d.jsonl", [row]))
    assert conversation.turns == (Turn("user", "Translate to French.\n\ngood morning"), Turn("assistant", "bonjour"))


def test_bom_and_crlf_are_accepted(tmp_path):
    path = write(tmp_path / "d.jsonl", [ROWS["prompt_response"]] * 3, newline="\r\n", bom=True)
    parsed = parse_jsonl(path)
    assert not parsed.problems and len(parsed.rows) == 3


def test_a_file_mixing_shapes_names_the_first_odd_line(tmp_path):
    path = write(tmp_path / "d.jsonl", [ROWS["messages"], ROWS["messages"], ROWS["alpaca"], ROWS["sharegpt"]])
    parsed = parse_jsonl(path)
    assert parsed.format == "messages" and len(parsed.rows) == 2
    assert str(parsed.problems[0]).startswith("line 3: a row in the alpaca shape, but the file's format is messages")


def test_a_row_of_no_known_shape_lists_the_accepted_shapes(tmp_path):
    parsed = parse_jsonl(write(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "A"}]))
    [problem] = parsed.problems
    assert "no known shape" in problem.problem and all(shape in problem.problem for shape in ROWS)


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "Q?"}], "no assistant turn"),
        ([{"role": "user", "content": "Q?"}, {"role": "bot", "content": "A"}], "unknown role 'bot'"),
        ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": 3}], "content is int"),
        (
            [
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A"},
                {"role": "user", "content": "Q"},
            ],
            "ends on a user turn",
        ),  # fmt: skip
        ([{"role": "user", "content": "Q?"}, SYSTEM, {"role": "assistant", "content": "A"}], "system turn may only"),
        ("hello", "non-empty list"),
    ],
)
def test_broken_messages_rows_say_why(tmp_path, messages, reason):
    parsed = parse_jsonl(write(tmp_path / "d.jsonl", [{"messages": messages}]))
    assert reason in str(parsed.problems[0]), parsed.problems


def test_written_conversations_read_back_equal(tmp_path):
    conversations = [Conversation.from_pair("Q?", "A", system="S"), Conversation.from_pair("é?", "ü")]
    write_jsonl(tmp_path / "d.jsonl", conversations)
    assert read_conversations(tmp_path / "d.jsonl") == conversations


def test_reading_a_malformed_file_is_a_clear_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(LLMOpsError, match="malformed rows"):
        read_conversations(tmp_path / "d.jsonl")


def test_the_key_ignores_whitespace_but_not_words():
    a = Conversation.from_pair("What  color is\nit?", "red ")
    assert a.key() == Conversation.from_pair("What color is it?", "red").key()
    assert a.key() != Conversation.from_pair("What color is it?", "blue").key()
