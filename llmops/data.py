"""The instruction dataset: JSONL rows of `{"prompt": ..., "response": ...}`, and its content hash.

Parsing is structural only (is each line a JSON object with string fields?) and never loads more than one
line at a time, so a multi-gigabyte or binary file is reported on, not read into memory. What the rows
say is judged by the Great Expectations suite in `tasks/validate.py`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmops.errors import LLMOpsError

FIELDS = ("prompt", "response")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass(frozen=True)
class RowProblem:
    line: int  # 0 for a problem of the whole file
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}" if self.line else self.problem


def parse_jsonl(path: Path, max_line_bytes: int = 1_000_000) -> tuple[list[tuple[int, Example]], list[RowProblem]]:
    """Read every row with its line number, collecting what is structurally wrong instead of stopping.

    Raises:
        LLMOpsError: the file does not exist or is not a regular file.
    """
    if not path.is_file():
        raise LLMOpsError(f"Dataset file {path} not found. Check the path (data.train / data.eval in params.yaml).")
    with path.open("rb") as handle:
        head = handle.read(8192)
    if not head.strip():
        return [], [RowProblem(0, "the file is empty")]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return [], [RowProblem(0, "the file is UTF-16 encoded; save it as UTF-8")]
    if b"\x00" in head:
        return [], [RowProblem(0, "the file is binary, not JSON Lines text")]
    if head.lstrip().startswith(b"["):
        return [], [
            RowProblem(
                0,
                "the file is one JSON array; JSON Lines needs one object per line (convert it with: jq -c '.[]' FILE)",
            )
        ]
    rows: list[tuple[int, Example]] = []
    problems: list[RowProblem] = []
    with path.open("rb") as handle:
        number = 0
        while raw := handle.readline(max_line_bytes + 1):
            number += 1
            if len(raw) > max_line_bytes:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the over-long line unread
                    raw = handle.readline(max_line_bytes)
                problems.append(RowProblem(number, f"longer than validate.max_line_bytes={max_line_bytes}"))
                continue
            if raw.strip():
                row, problem = _parse_line(raw, truncated=not raw.endswith(b"\n"))
                rows.extend([(number, row)] if row else [])
                problems.extend([RowProblem(number, problem)] if problem else [])
    return rows, problems


def _parse_line(raw: bytes, truncated: bool) -> tuple[Example | None, str | None]:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except json.JSONDecodeError as exc:
        hint = " (the file looks truncated)" if truncated else ""
        return None, f"not valid JSON ({exc.msg}){hint}"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    missing = [key for key in FIELDS if row.get(key) is None]
    if missing:
        return None, f"missing field(s): {', '.join(missing)}"
    wrong = [f"{key} is {type(row[key]).__name__}" for key in FIELDS if not isinstance(row[key], str)]
    if wrong:
        return None, f"fields must be strings ({', '.join(wrong)})"
    return Example(prompt=row["prompt"], response=row["response"]), None


def read_examples(path: Path) -> list[Example]:
    """Read a dataset that is known to be valid (it passed the validate stage)."""
    rows, problems = parse_jsonl(path)
    if problems:
        raise LLMOpsError(f"{path} has malformed rows ({problems[0]}); run `llmops validate --data {path}`.")
    return [example for _, example in rows]


def batch_files(path: Path) -> list[Path]:
    """An incoming batch: the JSONL file itself, or the `*.jsonl` files directly inside a folder (sorted)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LLMOpsError(f"Incoming data {path} does not exist: give a JSONL file or a folder of them.")
    return sorted(p for p in path.glob("*.jsonl") if p.is_file())


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


# --- Versioning with DVC: the only place that calls it. -------------------------------------------------


def dvc_root(path: Path) -> Path | None:
    """The DVC repository containing `path`, or None when it is not inside one."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def tracked_version(path: Path) -> tuple[Path, str] | None:
    """The `.dvc` file tracking `path` (the file itself or a folder above it) and the hash it records."""
    root = dvc_root(path)
    if root is None:
        return None
    for candidate in [path.resolve(), *path.resolve().parents]:
        if candidate == root:
            return None
        dvc_file = candidate.with_name(candidate.name + ".dvc")
        if dvc_file.is_file():
            [out] = yaml.safe_load(dvc_file.read_text())["outs"]
            return dvc_file, out["md5"]
    return None


_dvc_locks_held = threading.local()  # lock file -> depth, per thread


@contextmanager
def dvc_lock(root: Path) -> Iterator[None]:
    """Serialize DVC commands: two cannot run in one workspace (DVC's own lock would fail the second).

    Re-entrant within a thread, so a caller can hold it around a change to the data and the `dvc add` that
    versions it (see `tasks/ingest.py`); other threads and processes wait."""
    lock_path = root / ".dvc" / "tmp" / "llmops.lock"
    held = _dvc_locks_held.__dict__
    if held.get(lock_path):
        held[lock_path] += 1
        try:
            yield
        finally:
            held[lock_path] -= 1
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        held[lock_path] = 1
        try:
            yield
        finally:
            held[lock_path] = 0
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_dvc(root: Path, *args: str) -> str:
    """Run one DVC command in `root` (under the lock); a failure becomes an LLMOpsError with DVC's message."""
    with dvc_lock(root):
        done = subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=root,
            capture_output=True,
            text=True,
            env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        )
    if done.returncode:
        raise LLMOpsError(f"`dvc {' '.join(args)}` failed in {root}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def track(folder: Path, push: bool = True) -> str:
    """`dvc add` a dataset folder (and push it to the default remote); returns the version hash."""
    root = dvc_root(folder)
    if root is None:
        raise LLMOpsError(f"{folder} is not inside a DVC repository; run `dvc init` in the project first.")
    target = str(folder.resolve().relative_to(root))
    run_dvc(root, "add", target)
    if push:
        run_dvc(root, "push", f"{target}.dvc")
    _, version = tracked_version(folder)
    return version


def restore(dvc_record: str, root: Path) -> Path:
    """Materialise the exact data a `.dvc` record names under `<root>/.llmops-restore/<hash>/`, from the DVC
    cache or the remote; returns the restored file or folder.

    DVC refuses records in git-ignored folders, so the record is written beside `dvc.yaml` for the pull,
    pointing into the ignored restore folder, and removed afterwards.
    """
    record = yaml.safe_load(dvc_record)
    [out] = record["outs"]
    digest = out["md5"].removesuffix(".dir")
    target = Path(".llmops-restore") / digest / Path(out["path"]).name
    out["path"] = str(target)
    record_file = root / f"llmops-restore-{digest[:12]}.dvc"
    record_file.write_text(yaml.safe_dump(record))
    try:
        run_dvc(root, "pull", record_file.name)
    finally:
        record_file.unlink(missing_ok=True)
    # The original record beside the data says which version it is (see `tracked_version`).
    (root / target).with_name(f"{target.name}.dvc").write_text(dvc_record)
    return root / target


def restore_files(dvc_record: str, dvc_file: Path, files: list[Path]) -> list[Path]:
    """The given files, as they were in the version `dvc_record` names: restored through DVC (see `restore`).

    `dvc_file` is where the record lived when it was made; files inside the folder it tracked map into the
    restored copy, files outside it are returned unchanged.
    """
    root = dvc_root(dvc_file.parent)
    if root is None:
        raise LLMOpsError(f"{dvc_file} is not inside a DVC repository, so its data cannot be restored.")
    restored = restore(dvc_record, root)
    tracked = dvc_file.with_suffix("")
    return [restored / f.relative_to(tracked) if f.is_relative_to(tracked) else f for f in files]
