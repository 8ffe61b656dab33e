"""Fold new rows into the training set, only if they pass validation, and version the result with DVC.

Order matters for safety: the new file and the combined candidate are validated before anything is
touched; the candidate is written beside the dataset and swapped in with an atomic rename; only then is
it `dvc add`-ed and pushed. Bad data never replaces the dataset, and a crash at any point leaves the
previous version intact (on disk, or in the DVC cache it was pushed to). All of it runs under the DVC lock,
so two ingests at once never lose each other's rows: each reads the set the other left.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from llmops.chat import load_chat_template
from llmops.config import ValidateParams
from llmops.data import batch_files, dvc_lock, dvc_root, parse_jsonl, track, tracked_version, write_jsonl
from llmops.errors import LLMOpsError
from tasks.validate import DataReport, ExcessLength, InvalidData, check_split


class IngestResult(BaseModel, frozen=True):
    dataset: Path
    mode: str
    rows_before: int
    rows_after: int
    previous_version: str | None
    version: str


def ingest_dataset(
    params: ValidateParams,
    base_model: str,
    max_seq_len: int,
    new: Path,
    train: Path,
    eval: Path,
    mode: Literal["append", "replace"],
    archive: bool = False,
    excess_length: ExcessLength = "drop",
    chat_template: Path | None = None,
) -> IngestResult:
    """Validate `new` (a JSONL file, or a folder of them taken as one batch), append it to (or replace)
    `train`, and `dvc add` + push the dataset folder. With `archive`, the ingested files are then moved to
    `ingested/<time>/` beside them, so a watched folder's batch is folded in once.

    The batch is cleaned and judged like a split (rows already in `train` count as duplicates). It is added
    as it was given (cleaning happens again when the training set is validated); a batch in another row shape
    than `train` is stored with it in the `messages` shape, since one file holds one format.

    Raises:
        InvalidData: the new rows, or the training set they would make, fail validation (nothing changed).
        LLMOpsError: the dataset is not inside a DVC repository, or a DVC command failed (dataset restored).
    """
    root = dvc_root(train)
    if root is None:
        raise LLMOpsError(
            f"{train} is not inside a DVC repository, so an ingest could not be versioned. "
            "Run `dvc init` in the project (it is already one on a fresh clone of this repo)."
        )
    with dvc_lock(root):  # the same lock as `dvc add`: read, swap and version as one step
        files = batch_files(new)
        if not files:
            raise LLMOpsError(f"{new} holds no *.jsonl files: there is nothing to ingest.")
        batch = files[0]
        if len(files) > 1:  # one batch, validated as one file (row numbers count through the files in name order)
            batch = train.parent.parent / f".ingest-batch-{os.getpid()}.jsonl"
            batch.write_bytes(b"".join(_with_newline(f.read_bytes()) for f in files))
        options = {"excess_length": excess_length, "chat_template": load_chat_template(chat_template)}
        try:
            joins = train if mode == "append" else None
            incoming = check_split(params, base_model, max_seq_len, batch, other=eval, joins=joins, **options)
            new_rows = parse_jsonl(batch, params.max_line_bytes)
        finally:
            if batch != files[0]:
                batch.unlink()
        if not incoming.ok:
            raise InvalidData(DataReport(splits=[incoming.model_copy(update={"path": new})]))
        existing = parse_jsonl(train, params.max_line_bytes) if train.exists() and mode == "append" else None
        before = len(parse_jsonl(train, params.max_line_bytes).rows) if train.exists() else 0  # judged below, combined
        previous = tracked_version(train)

        fd, name = tempfile.mkstemp(prefix=".ingest-", suffix=".jsonl", dir=train.parent.parent)
        candidate = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                if existing is None or existing.format == new_rows.format:
                    out.write(_with_newline(train.read_bytes()) if existing else b"")
                    out.write(b"".join(_with_newline(f.read_bytes()) for f in files))
            if existing is not None and existing.format != new_rows.format:
                write_jsonl(candidate, [c for _, c in existing.rows + new_rows.rows])
            combined = check_split(params, base_model, max_seq_len, candidate, other=eval, **options)
            if not combined.ok:  # e.g. the new rows duplicate existing ones
                raise InvalidData(DataReport(splits=[combined.model_copy(update={"path": train})]))
            # A hard link keeps the old file reachable without a moment where `train` is missing; it lives
            # outside the tracked folder so `dvc add` never versions it.
            backup = candidate.with_suffix(".before")
            if train.exists():
                os.link(train, backup)
            os.replace(candidate, train)  # atomic: readers see the old file or the new one, never half of one
            try:
                version = track(train.parent)
            except BaseException:
                if backup.exists():
                    os.replace(backup, train)
                raise
            backup.unlink(missing_ok=True)
        finally:
            candidate.unlink(missing_ok=True)
            candidate.with_suffix(".before").unlink(missing_ok=True)
        if archive:
            done = files[0].parent / "ingested" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            done.mkdir(parents=True)
            for f in files:
                f.rename(done / f.name)
        return IngestResult(
            dataset=train.parent,
            mode=mode,
            rows_before=before,
            rows_after=combined.rows_read,
            previous_version=previous[1] if previous else None,
            version=version,
        )


def _with_newline(content: bytes) -> bytes:
    return content if content.endswith(b"\n") or not content else content + b"\n"
