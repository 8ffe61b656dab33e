import json

import pytest

from llmops.config import ValidateParams
from llmops.data import file_md5
from llmops.errors import LLMOpsError
from tasks.validate import InvalidData, validate_dataset

GOOD = "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(12))


def test_good_data_is_pinned_to_its_content(assets):
    train, eval_ = assets / "data" / "train.jsonl", assets / "data" / "eval.jsonl"
    ref = validate_dataset(ValidateParams(), train, eval_)
    assert ref.train_rows == len(train.read_text().splitlines())
    assert ref.train_md5 == file_md5(train)
    assert ref.digest.startswith(ref.train_md5[:16])


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (b"not json at all", "line 13: not valid JSON"),
        (b'["a", "list"]', "line 13: expected a JSON object"),
        (b'{"prompt": "only a prompt"}', "line 13: missing or non-string field.*response"),
        (b'{"prompt": "q", "response": 7}', "line 13: missing or non-string field.*response"),
        (b'{"prompt": "   ", "response": "a"}', "line 13: blank field.*prompt"),
        (b'{"prompt": "caf\xe9", "response": "a"}', "line 13: not valid UTF-8"),
        (b'{"prompt": "truncated', "line 13: not valid JSON"),
    ],
)
def test_each_malformed_row_is_rejected_with_its_line(tmp_path, bad_line, reason):
    train = tmp_path / "train.jsonl"
    train.write_bytes(GOOD.encode() + bad_line + b"\n")
    (tmp_path / "eval.jsonl").write_text(GOOD)
    with pytest.raises(InvalidData, match=reason) as caught:
        validate_dataset(ValidateParams(), train, tmp_path / "eval.jsonl")
    assert list(caught.value.problems) == [train]


def test_too_few_rows_is_rejected(tmp_path):
    (tmp_path / "train.jsonl").write_text(GOOD)
    (tmp_path / "eval.jsonl").write_text("")
    with pytest.raises(InvalidData, match="0 usable rows"):
        validate_dataset(ValidateParams(), tmp_path / "train.jsonl", tmp_path / "eval.jsonl")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(LLMOpsError, match="not found"):
        validate_dataset(ValidateParams(), tmp_path / "absent.jsonl", tmp_path / "absent.jsonl")
