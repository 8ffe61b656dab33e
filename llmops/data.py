"""The instruction dataset: JSONL rows of `{"prompt": ..., "response": ...}`, and its content hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llmops.errors import LLMOpsError


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass(frozen=True)
class RowProblem:
    line: int
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}"


def parse_jsonl(path: Path) -> tuple[list[Example], list[RowProblem]]:
    """Read every row, collecting what is wrong with each instead of stopping at the first problem.

    Raises:
        LLMOpsError: the file does not exist or is not a regular file.
    """
    if not path.is_file():
        raise LLMOpsError(f"Dataset file {path} not found. Check data.train / data.eval in params.yaml.")
    examples: list[Example] = []
    problems: list[RowProblem] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.append(RowProblem(number, "not valid UTF-8"))
                continue
            except json.JSONDecodeError as exc:
                problems.append(RowProblem(number, f"not valid JSON ({exc.msg})"))
                continue
            if not isinstance(row, dict):
                problems.append(RowProblem(number, f"expected a JSON object, got {type(row).__name__}"))
                continue
            missing = [key for key in ("prompt", "response") if not isinstance(row.get(key), str)]
            if missing:
                problems.append(RowProblem(number, f"missing or non-string field(s): {', '.join(missing)}"))
                continue
            blank = [key for key in ("prompt", "response") if not row[key].strip()]
            if blank:
                problems.append(RowProblem(number, f"blank field(s): {', '.join(blank)}"))
                continue
            examples.append(Example(prompt=row["prompt"], response=row["response"]))
    return examples, problems


def read_examples(path: Path) -> list[Example]:
    """Read a dataset that is known to be valid (it passed the validate stage)."""
    examples, problems = parse_jsonl(path)
    if problems:
        raise LLMOpsError(f"{path} has malformed rows ({problems[0]}); run `llmops validate --data {path}`.")
    return examples


def file_md5(path: Path) -> str:
    """MD5 of the file's bytes: the same hash DVC records for a tracked file."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"prompt": example.prompt, "response": example.response}) + "\n")
