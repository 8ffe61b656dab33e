import json
import re

import pytest

from llmops.config import ValidateParams
from llmops.data import file_md5
from llmops.errors import LLMOpsError
from tasks.validate import InvalidData, check_split, validate_dataset
from tests.data.bad_datasets import BAD_DATASETS, GOOD_ROWS, jsonl

PARAMS = ValidateParams(max_line_bytes=1000)
MAX_SEQ_LEN = 64


def test_demo_data_passes_and_is_pinned_to_its_content(assets):
    train, eval_ = assets / "data" / "train.jsonl", assets / "data" / "eval.jsonl"
    report = validate_dataset(ValidateParams(), str(assets / "model"), MAX_SEQ_LEN, train, eval_)
    assert report.ok, report.to_markdown()
    ref = report.require_valid()
    assert ref.train_rows == len(train.read_text().splitlines())
    assert ref.train_md5 == file_md5(train) and ref.digest.startswith(ref.train_md5[:16])


def test_good_corpus_rows_pass(tmp_path, assets):
    path = tmp_path / "good.jsonl"
    path.write_bytes(jsonl(GOOD_ROWS))
    assert check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, path).ok


@pytest.mark.parametrize("kind", list(BAD_DATASETS))
def test_each_kind_of_bad_data_is_rejected_for_its_reason(tmp_path, assets, kind):
    content, reason = BAD_DATASETS[kind]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    report = check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, path)
    assert not report.ok
    assert any(reason in problem for problem in report.problems()), report.problems()


def test_failures_name_the_offending_lines(tmp_path, assets):
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl([*GOOD_ROWS[:5], {"prompt": "Say hi", "response": "Say hi"}, *GOOD_ROWS[5:]]))
    [failure] = check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, path).failures
    assert failure.unexpected_rows == 1 and failure.example_lines == [6]


def test_train_prompts_leaking_into_eval_are_caught(tmp_path, assets):
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_bytes(jsonl(GOOD_ROWS))
    eval_.write_bytes(
        jsonl(GOOD_ROWS[:2] + [{"prompt": f"Name the color of the item {i}.", "response": "red"} for i in range(10)])
    )
    report = validate_dataset(PARAMS, str(assets / "model"), MAX_SEQ_LEN, train, eval_)
    [failure] = report.splits[0].failures
    assert "leakage" in failure.problem and failure.unexpected_rows == 2
    with pytest.raises(InvalidData, match="leakage"):
        report.require_valid()
    assert json.loads(report.model_dump_json())["splits"][0]["failures"][0]["example_lines"] == [1, 2]


def test_thresholds_come_from_params(tmp_path, assets):
    path = tmp_path / "data.jsonl"
    path.write_bytes(BAD_DATASETS["duplicated rows"][0])  # 3 duplicates in 15 rows
    assert not check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, path).ok
    tolerant = PARAMS.model_copy(update={"max_duplicate_ratio": 0.25})
    assert check_split(tolerant, str(assets / "model"), MAX_SEQ_LEN, path).ok


def test_missing_file_is_a_user_error(tmp_path, assets):
    with pytest.raises(LLMOpsError, match="not found"):
        check_split(PARAMS, str(assets / "model"), MAX_SEQ_LEN, tmp_path / "absent.jsonl")


def test_data_docs_are_built_per_split_and_readable_offline(tmp_path, assets):
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl([*GOOD_ROWS, {"prompt": "Say hi", "response": "Say hi"}]))
    validate_dataset(
        PARAMS, str(assets / "model"), MAX_SEQ_LEN, train, assets / "data" / "eval.jsonl", docs_dir=tmp_path / "docs"
    )
    [page] = (tmp_path / "docs" / "train" / "validations").rglob("*.html")
    html = page.read_text()
    assert "echoes_prompt" in html and "1 unexpected value" in html
    assert not re.search(r'(href|src)="https?://', html.split("</head>")[0])  # nothing fetched from a CDN
    assert (tmp_path / "docs" / "eval" / "index.html").exists()
