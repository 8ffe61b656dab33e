"""Fold new rows into the training set, only if they pass validation, and version the result with DVC.

Order matters for safety: the new file and the combined candidate are validated before anything is
touched; the candidate is written beside the dataset and swapped in with an atomic rename; only then is
it `dvc add`-ed and pushed. Bad data never replaces the dataset, and a crash at any point leaves the
previous version intact (on disk, or in the DVC cache it was pushed to). All of it runs under the DVC lock,
so two ingests at once never lose each other's rows: each reads the set the other left.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from llmops.chat import load_chat_template
from llmops.config import ValidateParams
from llmops.data import (
    batch_files,
    dvc_lock,
    dvc_root,
    parse_jsonl,
    split_files,
    track,
    tracked_version,
    write_jsonl,
)
from llmops.errors import LLMOpsError
from llmops.traffic import judged_traffic, traffic_log
from tasks.validate import DataReport, ExcessLength, InvalidData, check_split

log = logging.getLogger(__name__)

JUDGED_TRAFFIC_RULES = {"min_rows": 1, "max_dropped_ratio": 1.0}


class FoldedTraffic(BaseModel, frozen=True):
    """What an ingest took from a served-traffic log (`llmops.traffic`)."""

    log: Path
    folded: int  # judged exchanges added: corrected, or rated "up"
    left_out: int  # never judged, or judged "down" with no correction: never trained on
    duplicates: int  # judged, but the training set already holds them (folded by an earlier ingest), or repeats

    def summary(self) -> str:
        return (
            f"{self.folded} judged exchanges folded in; left out {self.left_out} never judged or judged down, "
            f"and {self.duplicates} already in the training set"
        )


class IngestResult(BaseModel, frozen=True):
    dataset: Path
    mode: str
    rows_before: int
    rows_after: int
    previous_version: str | None
    version: str | None  # unchanged (the previous version) when nothing was fit to fold in
    traffic: FoldedTraffic | None = None


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
    out: Path | None = None,
) -> IngestResult:
    """Validate `new` (a JSONL file, or a folder of them taken as one batch), append it to (or replace)
    `train`, and `dvc add` + push the dataset folder. With `archive`, the ingested files are then moved to
    `ingested/<time>/` beside them, so a watched folder's batch is folded in once.

    A folder may hold a served-traffic log (`llmops serve` writes one under `monitor.incoming/traffic`): its
    judged exchanges join too (corrected, or rated "up"; never an unjudged answer), unless the training set
    already holds them. The log itself is never moved.

    The batch is cleaned and judged like a split (rows already in `train` count as duplicates). It is added
    as it was given (cleaning happens again when the training set is validated); rows in another row shape
    than `train` are stored with it in the `messages` shape, since one file holds one format. When `train`
    is a folder split, its files stay as they are: the new rows land as a file of their own in it,
    `ingested-<UTC time>-<batch name>.jsonl`. With `out` (the validate stage's), the training set the rows
    make is checked as the validate stage checks it, and that stage reuses the check.

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
        served = traffic_log(new) if new.is_dir() else None
        if not files and served is None:
            raise LLMOpsError(f"{new} holds no *.jsonl files: there is nothing to ingest.")
        options = {"excess_length": excess_length, "chat_template": load_chat_template(chat_template)}
        current = parse_jsonl(train, params.max_line_bytes) if train.exists() else None
        existing = current if mode == "append" else None  # the rows the new ones join
        before = len(current.rows) if current else 0
        previous = tracked_version(train)

        def check(part: Path, shown_as: Path, rules: ValidateParams = params) -> None:
            joins = train if mode == "append" else None  # rows already in `train` count as duplicates
            report = check_split(rules, base_model, max_seq_len, part, other=eval, joins=joins, **options)
            if not report.ok:
                raise InvalidData(DataReport(splits=[report.model_copy(update={"path": shown_as})]))

        scratch = Path(tempfile.mkdtemp(prefix=".ingest-", dir=train.parent.parent))  # outside the tracked folder
        try:
            parts: list[Path] = []  # checked files whose rows join the training set
            if files:  # one batch, validated as one file (row numbers count through the files in name order)
                batch = files[0] if len(files) == 1 else _concatenate(files, scratch / "batch.jsonl")
                check(batch, new)
                parts.append(batch)
            traffic = None
            if served is not None:
                judged = judged_traffic(served, {c.key() for _, c in existing.rows} if existing else set())
                traffic = FoldedTraffic(
                    log=served, folded=judged.folded, left_out=judged.left_out, duplicates=judged.duplicates
                )
                log.info("traffic log %s: %s", served, traffic.summary())
                if judged.rows:
                    write_jsonl(scratch / "traffic.jsonl", judged.rows)
                    # However few, judged rows count; what cleaning drops of them is judged with the whole set.
                    check(scratch / "traffic.jsonl", served, params.model_copy(update=JUDGED_TRAFFIC_RULES))
                    parts.append(scratch / "traffic.jsonl")
            if not parts:  # a traffic log with nothing judged fit to train on: the dataset stays as it is
                version = previous[1] if previous else None
                return IngestResult(
                    dataset=train.parent,
                    mode=mode,
                    rows_before=before,
                    rows_after=before,
                    previous_version=version,
                    version=version,
                    traffic=traffic,
                )
            if train.is_dir():
                combined, version = _add_to_folder(train, new, parts, params, scratch, mode, base_model, max_seq_len,
                                                   eval, options, out)  # fmt: skip
            else:
                candidate = scratch / "candidate.jsonl"
                sources = ([train] if existing else []) + parts  # the rows kept, then the new ones
                parsed = [existing] if existing else []
                parsed += [parse_jsonl(part, params.max_line_bytes) for part in parts]
                if len({p.format for p in parsed}) == 1:  # one shape: the files' own bytes
                    _concatenate(sources, candidate)
                else:
                    write_jsonl(candidate, [c for p in parsed for _, c in p.rows])
                combined = check_split(params, base_model, max_seq_len, candidate, other=eval, **options)
                if not combined.ok:  # e.g. the new rows duplicate existing ones
                    raise InvalidData(DataReport(splits=[combined.model_copy(update={"path": train})]))
                # A hard link keeps the old file reachable without a moment where `train` is missing; it lives
                # outside the tracked folder so `dvc add` never versions it.
                backup = scratch / "before.jsonl"
                if train.exists():
                    os.link(train, backup)
                os.replace(candidate, train)  # atomic: readers see the old file or the new one, never half of one
                try:
                    version = track(train.parent)
                except BaseException:
                    if backup.exists():
                        os.replace(backup, train)
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if archive and files:
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
            traffic=traffic,
        )


def _add_to_folder(train, new, parts, params, scratch, mode, base_model, max_seq_len, eval, options, out):
    """The new rows as a file of their own in the folder split `train` (its other files replaced in `replace`
    mode), checked first as the split they make, then versioned. Returns (that check, the new version)."""
    parsed = [parse_jsonl(part, params.max_line_bytes) for part in parts]
    staged = scratch / train.name  # the split as it will be: the same names, so the validate stage reuses the check
    staged.mkdir()
    kept = split_files(train) if mode == "append" else []
    for f in kept:
        os.link(f, staged / f.name)
    target = staged / f"ingested-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{new.stem}.jsonl"
    if len({p.format for p in parsed}) == 1:  # one shape: the batch's own bytes
        _concatenate(parts, target)
    else:
        write_jsonl(target, [c for p in parsed for _, c in p.rows])
    combined = check_split(params, base_model, max_seq_len, staged, other=eval, out=out, **options)
    if not combined.ok:  # e.g. the new rows duplicate existing ones
        raise InvalidData(DataReport(splits=[combined.model_copy(update={"path": train})]))
    replaced = [] if mode == "append" else split_files(train)
    backup = scratch / "before"
    backup.mkdir()
    for f in replaced:  # kept reachable outside the tracked folder until the new version is pushed
        os.replace(f, backup / f.name)
    os.replace(target, train / target.name)
    try:
        return combined, track(train.parent)
    except BaseException:
        (train / target.name).unlink(missing_ok=True)
        for f in replaced:
            os.replace(backup / f.name, f)
        raise


def _concatenate(files: list[Path], out: Path) -> Path:
    out.write_bytes(b"".join(_with_newline(f.read_bytes()) for f in files))
    return out


def _with_newline(content: bytes) -> bytes:
    return content if content.endswith(b"\n") or not content else content + b"\n"
