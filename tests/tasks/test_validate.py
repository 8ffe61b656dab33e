import json
import re

import pytest

from llmops.chat import render
from llmops.config import ValidateParams
from llmops.data import Conversation, Turn, read_conversations
from llmops.errors import LLMOpsError
from llmops.modeling import load_tokenizer
from tasks.validate import InvalidData, check_split, validate_dataset
from tests.data.bad_datasets import BAD_DATASETS, GOOD_MESSAGES, GOOD_ROWS, jsonl

PARAMS = ValidateParams(max_line_bytes=1000)
STRICT = PARAMS.model_copy(update={"max_dropped_ratio": 0.0})  # any dropped row fails the split
MAX_SEQ_LEN = 64
CHAT_MAX_SEQ_LEN = 160  # room for a system prompt and two exchanges


def test_demo_data_passes_and_is_pinned_to_its_content(assets):
    train, eval_ = assets / "data" / "train", assets / "data" / "eval"
    report = validate_dataset(ValidateParams(), str(assets / "model"), 1024, train, eval_)
    assert report.ok, report.to_markdown()
    ref = report.require_valid()
    assert ref.train_rows == len(read_conversations(train)) and ref.raw_train == train  # a folder split
    assert report.splits[0].format == "messages" and not report.splits[0].dropped
    assert ref.digest.startswith(ref.raw_train_md5[:16])


def test_good_corpus_rows_pass(tmp_path, assets):
    path = tmp_path / "good.jsonl"
    path.write_bytes(jsonl(GOOD_ROWS))
    assert check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, path).ok


@pytest.mark.parametrize("kind", list(BAD_DATASETS))
def test_each_kind_of_bad_data_is_rejected_for_its_reason(tmp_path, assets, kind):
    content, reason = BAD_DATASETS[kind]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    report = check_split(STRICT, str(assets / "model"), MAX_SEQ_LEN, path)
    assert not report.ok
    assert any(reason in problem for problem in report.problems()), report.problems()


def test_failures_name_the_offending_lines(tmp_path, assets):
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl([*GOOD_ROWS[:5], {"prompt": "Say hi", "response": "Say hi"}, *GOOD_ROWS[5:]]))
    [failure] = check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, path).failures
    assert failure.unexpected_rows == 1 and failure.example_lines == [6]


def test_eval_copies_are_dropped_and_prompts_leaking_into_eval_are_caught(tmp_path, assets):
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    same_prompt_other_answer = {"prompt": GOOD_ROWS[2]["prompt"], "response": "purple"}
    train.write_bytes(
        jsonl(GOOD_ROWS + [{"prompt": f"Name the color of the item {i}.", "response": "red"} for i in range(10)])
    )
    eval_.write_bytes(jsonl([GOOD_ROWS[0], GOOD_ROWS[1], same_prompt_other_answer]))
    report = validate_dataset(PARAMS, str(assets / "model"), MAX_SEQ_LEN, train, eval_, out=tmp_path / "out")
    split = report.splits[0]
    [copies] = split.dropped
    assert copies.reason == "in_eval" and copies.rows == 2 and copies.example_lines == [1, 2]
    [failure] = split.failures  # GOOD_ROWS[2]: the same prompt as an eval row, with another answer
    assert "leakage" in failure.problem and failure.unexpected_rows == 1
    with pytest.raises(InvalidData, match="leakage"):
        report.require_valid()
    assert json.loads(report.model_dump_json())["splits"][0]["failures"][0]["example_lines"] == [3]


def test_thresholds_come_from_params(tmp_path, assets):
    path = tmp_path / "data.jsonl"
    path.write_bytes(BAD_DATASETS["duplicated rows"][0])  # 3 duplicates in 15 rows
    assert not check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, path).ok
    tolerant = PARAMS.model_copy(update={"max_dropped_ratio": 0.25})
    report = check_split(tolerant, str(assets / "model"), MAX_SEQ_LEN, path)
    assert report.ok and report.rows_read == 15 and report.rows == 12


def messages(*turns, system="Answer with one word."):
    roles = ["user", "assistant"] * len(turns)
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": head + [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)]}


LONG_QUESTION = "Tell me, " + " ".join(["please"] * 80) + ", what color is the tiger?"


def test_a_messy_chat_export_is_cleaned_counted_and_the_cleaned_split_is_what_trains(tmp_path, assets):
    good = [messages(f"What color is item {i}?", "red", f"And item {i + 1}?", "blue") for i in range(40)]
    rows = [*good, good[3], messages("What color is the sled?", ""), messages(LONG_QUESTION, "brown")]
    train, eval_ = tmp_path / "export.jsonl", tmp_path / "eval.jsonl"
    train.write_bytes(jsonl(rows))
    eval_.write_bytes(jsonl([messages(f"Name the color of thing {i}.", "red") for i in range(10)]))
    report = validate_dataset(PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, train, eval_, out=tmp_path / "out")
    split = report.splits[0]
    assert split.ok, split.problems()  # 3 of 43 dropped: under validate.max_dropped_ratio
    by_reason = {g.reason: (g.rows, g.example_lines) for g in split.dropped}
    assert by_reason == {"duplicate": (1, [41]), "short_response": (1, [42]), "excess_length": (1, [43])}
    assert split.rows_read == 43 and split.rows == 40 and split.format == "messages"
    assert "| longer than finetune.max_seq_len=160 tokens (data.excess_length) | 1 | 43 |" in report.to_markdown()
    assert read_conversations(report.require_valid().train) == read_conversations(train)[:40]


def test_too_much_dropped_fails_the_split_with_the_reasons(tmp_path, assets):
    rows = [messages(f"What color is item {i}?", "red") for i in range(12)] + [messages("Sled?", "")] * 2
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(rows))
    report = check_split(PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, path)
    [failure] = report.failures
    assert "dropped 2 of 14 rows (14%), above validate.max_dropped_ratio=0.1" in failure.problem
    assert "response shorter than 2 characters" in failure.problem and failure.example_lines == [13, 14]


def test_excess_length_policies(tmp_path, assets):
    tokenizer = load_tokenizer(assets / "model")
    long_history = messages("What color is the tiger?", "brown", LONG_QUESTION, "brown")
    rows = [messages(f"What color is item {i}?", "red") for i in range(12)] + [long_history]
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(rows))
    model = str(assets / "model")

    raised = check_split(PARAMS, model, MAX_SEQ_LEN, path, excess_length="raise")
    assert (
        not raised.ok and "data.excess_length: raise" in raised.problems()[0] and "line(s) 13" in raised.problems()[0]
    )

    dropped = check_split(PARAMS, model, MAX_SEQ_LEN, path, excess_length="drop")
    assert dropped.ok and dropped.rows == 12 and dropped.dropped[0].reason == "excess_length"

    kept = check_split(PARAMS, model, MAX_SEQ_LEN, path, excess_length="truncate_prompt", out=tmp_path / "out")
    assert kept.ok and kept.rows == 13 and kept.truncated == 1 and not kept.dropped
    shortened = read_conversations(kept.cleaned)[-1]
    # The whole last answer stays; the first exchange went first, then the start of the long question.
    assert [t.role for t in shortened.turns] == ["system", "user", "assistant"]
    assert shortened.reference == "brown" and shortened.last_user.endswith("what color is the tiger?")
    assert len(shortened.last_user) < len(LONG_QUESTION)
    assert len(render(tokenizer, shortened)[0]) <= MAX_SEQ_LEN


@pytest.mark.parametrize(
    ("mode", "ok", "kept_text"), [("redact", True, False), ("fail", False, True), ("allow", True, True)]
)
def test_personal_data_is_redacted_refused_or_allowed_and_always_counted(tmp_path, assets, mode, ok, kept_text):
    rows = [*GOOD_MESSAGES, messages("My mail is ann@example.com, card 4111 1111 1111 1111.", "Noted")]
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(rows))
    params = PARAMS.model_copy(update={"pii": mode})
    report = check_split(params, str(assets / "model"), CHAT_MAX_SEQ_LEN, path, out=tmp_path / "out")
    assert report.ok == ok and report.pii == {"email": 1, "card": 1}
    cleaned = read_conversations(report.cleaned)[-1].last_user
    assert ("ann@example.com" in cleaned) == kept_text
    if mode == "redact":
        assert cleaned == "My mail is [REDACTED:email], card [REDACTED:card]."
    if mode == "fail":
        assert "personal data (card 1, email 1)" in report.problems()[0]


def test_the_cleaned_splits_and_their_hashes_go_into_the_dataset_reference(tmp_path, assets):
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_bytes(jsonl([*GOOD_MESSAGES, GOOD_MESSAGES[0]]))
    eval_.write_bytes(jsonl(GOOD_MESSAGES[:0] + [messages(f"Name the color of item {i}.", "red") for i in range(10)]))
    ref = validate_dataset(
        PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, train, eval_, out=tmp_path / "out"
    ).require_valid()
    assert ref.train == tmp_path / "out" / f"train-{ref.train_md5[:12]}.jsonl" and ref.train_rows == 12
    assert ref.raw_train == train and ref.dropped == {"duplicate": 1}
    tags = ref.lineage_tags()
    assert tags["dataset.train"] == str(train) and tags["dataset.cleaned_train_md5"] == ref.train_md5
    assert ref.train_md5 != ref.raw_train_md5 and ref.digest.startswith(ref.raw_train_md5[:16])
    assert read_conversations(ref.train) == [
        Conversation.from_pair(r["prompt"], r["response"], system="Answer with one word.") for r in GOOD_ROWS
    ]


def test_missing_file_is_a_user_error(tmp_path, assets):
    with pytest.raises(LLMOpsError, match="not found"):
        check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, tmp_path / "absent.jsonl")


def test_data_docs_are_built_per_split_and_readable_offline(tmp_path, assets):
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl([*GOOD_ROWS, {"prompt": "Say hi", "response": "Say hi"}]))
    validate_dataset(
        PARAMS, str(assets / "model"), MAX_SEQ_LEN, train, assets / "data" / "eval", docs_dir=tmp_path / "docs"
    )
    [page] = (tmp_path / "docs" / "train" / "validations").rglob("*.html")
    html = page.read_text()
    assert "echoes_prompt" in html and "1 unexpected value" in html
    assert not re.search(r'(href|src)="https?://', html.split("</head>")[0])  # nothing fetched from a CDN
    assert (tmp_path / "docs" / "eval" / "index.html").exists()


# --- Conversations as people export them: cut mid-way, opened by an agent, turns that cannot train. ----------


def sharegpt(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": speaker, "value": text} for speaker, text in turns]}


GREETING = ("gpt", "Hello! How can I help you today?")
EXPORT = [sharegpt(("human", f"What color is item {i}?"), ("gpt", "red")) for i in range(30)] + [
    sharegpt(GREETING, ("human", "What color is the sled?"), ("gpt", "green")),  # line 31: opens with the agent
    sharegpt(("gpt", "...as I said."), ("human", "And the canoe?"), ("gpt", "green")),  # 32: cut mid-way
    sharegpt(("human", "What color is the wagon?")),  # 33: no answer at all
    sharegpt(("human", "Hi?"), ("gpt", "Hello."), ("human", "What color is the tiger?")),  # 34: cut before the answer
]


def test_an_export_cut_mid_way_renders_as_it_is_where_the_template_accepts_it(tmp_path, assets):
    """The plain template renders a conversation that opens with the assistant as it is: nothing repaired."""
    path = tmp_path / "export.jsonl"
    path.write_bytes(jsonl(EXPORT))
    report = check_split(PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, path, out=tmp_path / "out")
    assert report.ok, report.problems()  # 2 of 34 dropped: under validate.max_dropped_ratio
    assert {g.reason: g.example_lines for g in report.dropped} == {"no_assistant_turn": [33], "ends_on_user_turn": [34]}
    assert not report.repaired and report.rows == 32
    kept = read_conversations(report.cleaned)
    assert kept[30].turns[0] == Turn("assistant", GREETING[1])
    assert report.counts()["dropped.ends_on_user_turn"] == 1


def test_a_template_that_refuses_an_opening_assistant_turn_gets_the_row_repaired_and_counted(tmp_path, assets):
    """Mistral's strict alternation raises on it: the opening turns are dropped, the rest of the row trains."""
    from tests.data.chat_templates import MISTRAL

    path = tmp_path / "export.jsonl"
    path.write_bytes(jsonl(EXPORT))
    report = check_split(
        PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, path, out=tmp_path / "out", chat_template=MISTRAL
    )
    assert report.ok, report.problems()
    [repaired] = report.repaired
    assert (repaired.reason, repaired.rows, repaired.example_lines) == ("opening_assistant_turns", 2, [31, 32])
    assert report.rows == 32 and report.counts()["repaired.opening_assistant_turns"] == 2
    kept = read_conversations(report.cleaned)
    assert kept[30].turns == (Turn("user", "What color is the sled?"), Turn("assistant", "green"))
    assert "repaired opening assistant turns dropped" in "\n".join(report.cleaning_lines())


def test_rows_that_cannot_train_are_dropped_within_the_ratio_and_refuse_the_split_above_it(tmp_path, assets):
    broken = [
        sharegpt(("human", "Q?"), ("system", "Be brief."), ("gpt", "A")),
        sharegpt(("human", "What color is the wagon?")),
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A", "weight": 0}]},
    ]
    path = tmp_path / "export.jsonl"
    path.write_bytes(jsonl(EXPORT[:12]) + jsonl(broken[:2]))
    report = check_split(PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, path)
    [failure] = report.failures  # 2 of 14 > 10%: the file is refused, with the reasons and where
    assert "a system turn after the first turn: 1" in failure.problem and failure.example_lines == [13, 14]
    messages = tmp_path / "messages.jsonl"
    messages.write_bytes(jsonl([messages_row(i) for i in range(20)] + [broken[2]]))
    report = check_split(PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, messages)
    assert report.ok and {g.reason for g in report.dropped} == {"no_trained_turn"}


def messages_row(i: int) -> dict:
    return messages(f"What color is item {i}?", "red")


def test_a_folder_split_is_checked_file_by_file_and_rows_are_named_by_file_and_line(tmp_path, assets):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "a-export.jsonl").write_bytes(jsonl(EXPORT[:20]))  # ShareGPT
    (folder / "b-ingested.jsonl").write_bytes(jsonl([*GOOD_ROWS, GOOD_ROWS[0], {"prompt": "Hi", "response": "Hi"}]))
    report = check_split(PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, folder, out=tmp_path / "out")
    assert report.format == "sharegpt+prompt_response" and report.rows_read == 34 and report.path == folder
    assert [(g.reason, g.example_lines) for g in report.dropped] == [("duplicate", ["b-ingested.jsonl:13"])]
    [echo] = report.failures
    assert echo.problem == "response repeats the prompt" and echo.example_lines == ["b-ingested.jsonl:14"]
    (folder / "c-broken.jsonl").write_bytes(b'{"prompt": "x", "response": "y"}\n{oops\n')
    report = check_split(PARAMS, str(assets / "model"), CHAT_MAX_SEQ_LEN, folder)
    assert not report.ok and report.structural[0].startswith("c-broken.jsonl:2: not valid JSON")


def test_the_same_split_checked_again_is_not_walked_again(tmp_path, assets, caplog):
    """A drift retrain's ingest checks the training set the new rows make; its validate stage then finds the
    walk under the split's content hash, and only the suite runs again."""
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(jsonl([*GOOD_ROWS, GOOD_ROWS[0]]))
    check = lambda: check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, folder, out=tmp_path / "out")  # noqa: E731
    with caplog.at_level("INFO", logger="tasks.validate"):
        first = check()
        second = check()
    walks = [r.message for r in caplog.records if "walk" in r.message]
    assert walks[0].startswith(f"walked {folder}") and "is reused" in walks[1] and len(walks) == 2
    assert second == first and second.cleaned.is_file()
    (folder / "b.jsonl").write_bytes(jsonl([{"prompt": "What color is the rug?", "response": "teal"}]))
    caplog.clear()
    with caplog.at_level("INFO", logger="tasks.validate"):
        third = check()
    assert third.rows == first.rows + 1 and not any("is reused" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("private key block", "-----BEGIN RSA PRIVATE KEY-----\nMIIE"),
        ("AWS access key", "key AKIAIOSFODNN7EXAMPLE here"),
        ("GitHub token", "ghp_" + "a1" * 18),
        ("OpenAI-style API key", "sk-live_4f9a8b7c6d5e4f3a2b1c0d9e"),
        ("Slack token", "xoxb-1234567890-abcdef"),
        ("Google API key", "AIza" + "B" * 35),
        ("JSON web token", "eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.SflKxwRJSMeKKF2QT4"),
    ],
)
def test_every_credential_pattern_is_found_by_the_fast_scan(name, text):
    """The scan checks each pattern's fixed prefix before running it: a pattern added to
    privacy.SECRET_PATTERNS without an example here fails the next test."""
    from tasks.validate import SECRET_PATTERNS, _Scanner

    assert re.search(SECRET_PATTERNS[name], text)
    assert _Scanner([]).credential(f"Please use {text} for the call.")


def test_every_credential_pattern_has_an_example_above():
    from tasks.validate import SECRET_PATTERNS

    tested = {args[0] for args in test_every_credential_pattern_is_found_by_the_fast_scan.pytestmark[0].args[1]}
    assert tested == set(SECRET_PATTERNS)
