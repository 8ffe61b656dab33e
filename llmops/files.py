"""Artifact folders: written atomically, each carrying the config and metadata that made it."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only if the block succeeds.

    A crash leaves at most a `*.partial-*` folder behind, never a half-written `out` that a later stage
    would trust. An existing `out` is replaced.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_stage_metadata(folder: Path, stage: str, params: BaseModel, **facts: Any) -> None:
    """Save the effective stage config and a small record of what made this folder."""
    write_json(folder / "llmops_config.json", params.model_dump(mode="json"))
    write_json(
        folder / "llmops_metadata.json",
        {"stage": stage, "created_at": datetime.now(UTC).isoformat(timespec="seconds"), **facts},
    )


RESULT_FILE = "llmops_result.json"
ResultT = TypeVar("ResultT", bound=BaseModel)


def save_result(result: BaseModel, folder: Path) -> None:
    """Write a stage's result beside its outputs, so a later stage run as its own process can read it."""
    write_json(folder / RESULT_FILE, result.model_dump(mode="json"))


def load_result(kind: type[ResultT], folder: Path) -> ResultT:
    return kind.model_validate_json((folder / RESULT_FILE).read_text())
