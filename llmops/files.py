"""Artifact folders: written atomically, each carrying the config and metadata that made it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

log = logging.getLogger(__name__)


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


@contextmanager
def exclusive(lock_file: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock (flock) on `lock_file` for the block, across processes; if another process
    holds it, log `waiting` once and wait. The kernel releases it if the holder dies, however it dies."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s (lock %s)", waiting, lock_file)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_stage_metadata(folder: Path, stage: str, params: BaseModel, **facts: Any) -> None:
    """Save the effective stage config and a small record of what made this folder (credentials masked)."""
    write_json(folder / "llmops_config.json", masked(params.model_dump(mode="json")))
    write_json(
        folder / "llmops_metadata.json",
        masked({"stage": stage, "created_at": datetime.now(UTC).isoformat(timespec="seconds"), **facts}),
    )


# `scheme://user:password@host`, and `password=...`-style query values: what a database or object-store URI
# carries. Masked wherever params are logged, printed or saved; the real value stays in the environment.
_URI_PASSWORD = re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/:@\s]*:)[^@\s/]+@")
_QUERY_SECRET = re.compile(
    r"(?P<keep>[?&;](?:password|passwd|pwd|token|secret|access_key|secret_key|api_key|sig|signature)=)[^&;\s]+",
    re.IGNORECASE,
)


def mask_secrets(text: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db` (and `?password=x` -> `?password=***`)."""
    return _QUERY_SECRET.sub(r"\g<keep>***", _URI_PASSWORD.sub(r"\g<keep>***@", text))


def masked(value: Any) -> Any:
    """A JSON-like value with every string passed through `mask_secrets`."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {key: masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    return value


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes, except the metadata file's creation time: two
    folders with the same digest hold the same model, bit for bit."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "llmops_metadata.json"):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


RESULT_FILE = "llmops_result.json"
ResultT = TypeVar("ResultT", bound=BaseModel)


def save_result(result: BaseModel, folder: Path) -> None:
    """Write a stage's result beside its outputs, so a later stage run as its own process can read it."""
    write_json(folder / RESULT_FILE, result.model_dump(mode="json"))


def load_result(kind: type[ResultT], folder: Path) -> ResultT:
    return kind.model_validate_json((folder / RESULT_FILE).read_text())
