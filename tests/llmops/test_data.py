"""Every accepted row shape becomes the same conversation; files of one shape each, BOM and CRLF accepted; a
split is a file or a folder of them; turns that are context only."""

import json

import pytest

from llmops.data import (
    Conversation,
    Turn,
    parse_jsonl,
    read_conversations,
    split_files,
    split_md5,
    structure_problem,
    write_jsonl,
)
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
        ([{"role": "user", "content": "Q?"}, {"role": "bot", "content": "A"}], "unknown role 'bot'"),
        ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": 3}], "content is int"),
        ([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A", "weight": 0.5}], "weight is 0.5"),
        ("hello", "non-empty list"),
    ],
)
def test_broken_messages_rows_say_why(tmp_path, messages, reason):
    parsed = parse_jsonl(write(tmp_path / "d.jsonl", [{"messages": messages}]))
    assert reason in str(parsed.problems[0]), parsed.problems


USER, ANSWER = Turn("user", "Q?"), Turn("assistant", "A")


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ((USER, ANSWER), None),
        ((Turn("system", "S"), USER, ANSWER), None),
        ((Turn("assistant", "Hello, how can I help?"), USER, ANSWER), None),  # the template decides
        ((USER,), "no_assistant_turn"),
        ((USER, ANSWER, Turn("user", "And?")), "ends_on_user_turn"),
        ((USER, Turn("system", "S"), ANSWER), "system_not_first"),
        ((USER, Turn("assistant", "A", train=False)), "no_trained_turn"),
    ],
)
def test_the_order_of_turns_is_read_as_written_and_judged_per_row(tmp_path, turns, problem):
    """What a conversation's turns say is no longer a reason to refuse the file: cleaning judges each row."""
    write_jsonl(tmp_path / "d.jsonl", [Conversation(turns)])
    [(_, conversation)] = parse_jsonl(tmp_path / "d.jsonl").rows
    assert conversation == Conversation(turns) and structure_problem(conversation) == problem


def test_opening_assistant_turns_can_be_dropped():
    greeting = Conversation((Turn("system", "S"), Turn("assistant", "Hi!"), Turn("assistant", "Hello?"), USER, ANSWER))
    assert greeting.opening_assistant_turns == 2
    assert greeting.without_opening_assistant_turns().turns == (Turn("system", "S"), USER, ANSWER)
    assert greeting.prompt[-1] == USER and greeting.reference == "A"


def test_weight_0_makes_an_assistant_turn_context_and_is_written_back(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "what the client sent", "weight": 0},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "A", "weight": 1},
        ]
    }
    [conversation] = read_conversations(write(tmp_path / "d.jsonl", [row]))
    assert [t.train for t in conversation.turns] == [True, False, True, True]
    assert Turn("user", "Q?") == Turn("user", "Q?", train=True)  # the default: every turn as before
    written = conversation.to_row()["messages"]
    assert written[1] == {"role": "assistant", "content": "what the client sent", "weight": 0}
    assert all("weight" not in m for i, m in enumerate(written) if i != 1)
    write_jsonl(tmp_path / "back.jsonl", [conversation])
    assert read_conversations(tmp_path / "back.jsonl") == [conversation]


def test_a_folder_split_reads_its_files_in_name_order_each_in_its_own_shape(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    write(folder / "b-export.jsonl", [ROWS["sharegpt"]] * 2)
    write(folder / "a-export.jsonl", [ROWS["prompt_response"]])
    write(folder / ".half-written.jsonl", [{"not": "a row"}])  # hidden: a write in progress
    (folder / "notes.txt").write_text("not a split file")
    assert [p.name for p in split_files(folder)] == ["a-export.jsonl", "b-export.jsonl"]
    parsed = parse_jsonl(folder)
    assert not parsed.problems and parsed.format == "prompt_response+sharegpt"
    assert [where for where, _ in parsed.rows] == ["a-export.jsonl:1", "b-export.jsonl:1", "b-export.jsonl:2"]
    assert len(read_conversations(folder)) == 3
    before = split_md5(folder)
    write(folder / "c.jsonl", [ROWS["alpaca"]])
    assert split_md5(folder) != before


def test_a_file_of_a_folder_split_still_holds_one_shape_and_its_problems_name_it(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    write(folder / "mixed.jsonl", [ROWS["messages"], ROWS["alpaca"]])
    [problem] = parse_jsonl(folder).problems
    assert str(problem).startswith("mixed.jsonl:2: a row in the alpaca shape, but the file's format is messages")


def test_a_split_that_is_missing_or_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LLMOpsError, match="not found"):
        split_files(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMOpsError, match="holds no \\*.jsonl files"):
        split_files(tmp_path / "empty")


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
