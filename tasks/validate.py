"""Reject malformed data before anything trains.

Checks each split's structure row by row (valid UTF-8 JSON objects with non-blank string `prompt` and
`response`) and its size. The Great Expectations suite plugs in here: `validate_dataset` is the one entry
point the flow, the CLI and DVC call.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from llmops.config import ValidateParams
from llmops.data import RowProblem, file_md5, parse_jsonl
from llmops.errors import LLMOpsError
from llmops.orchestration import stage

MAX_PROBLEMS_SHOWN = 5


class DatasetRef(BaseModel, frozen=True):
    """A validated dataset: where it is and exactly which content it had."""

    train: Path
    eval: Path
    train_rows: int
    eval_rows: int
    train_md5: str
    eval_md5: str

    @property
    def digest(self) -> str:
        """One hash for the pair of splits, recorded as the run's dataset lineage."""
        return f"{self.train_md5[:16]}{self.eval_md5[:16]}"


class InvalidData(LLMOpsError):
    """The dataset failed validation; `problems` lists what is wrong, file by file."""

    def __init__(self, problems: dict[Path, list[RowProblem | str]]):
        self.problems = problems
        parts = []
        for path, found in problems.items():
            shown = "; ".join(str(p) for p in found[:MAX_PROBLEMS_SHOWN])
            more = f" (and {len(found) - MAX_PROBLEMS_SHOWN} more)" if len(found) > MAX_PROBLEMS_SHOWN else ""
            parts.append(f"{path}: {shown}{more}")
        super().__init__(
            "Dataset failed validation, nothing was trained: " + " | ".join(parts) + ". Fix or remove these "
            "rows (each line must be a JSON object with non-blank string fields prompt and response)."
        )


def check_split(params: ValidateParams, path: Path) -> tuple[int, list[RowProblem | str]]:
    """Rows that passed and the problems found in one split."""
    examples, problems = parse_jsonl(path)
    found: list[RowProblem | str] = list(problems)
    if len(examples) < params.min_rows:
        found.append(f"{len(examples)} usable rows, fewer than validate.min_rows={params.min_rows}")
    return len(examples), found


def validate_dataset(params: ValidateParams, train: Path, eval: Path) -> DatasetRef:
    """Validate both splits and return a reference pinned to their content hashes.

    Raises:
        InvalidData: any row is malformed or a split has too few rows.
        LLMOpsError: a split's file does not exist.
    """
    (train_rows, train_problems), (eval_rows, eval_problems) = (
        check_split(params, train),
        check_split(params, eval),
    )
    problems = {path: found for path, found in ((train, train_problems), (eval, eval_problems)) if found}
    if problems:
        raise InvalidData(problems)
    return DatasetRef(
        train=train,
        eval=eval,
        train_rows=train_rows,
        eval_rows=eval_rows,
        train_md5=file_md5(train),
        eval_md5=file_md5(eval),
    )


validate_task = stage(validate_dataset)
