"""Training data: JSONL rows in any of five shapes, read into one conversation type; the dataset reference
the stages pass along; and its versioning with DVC.

A split (`data.train`, `data.eval`) is one JSONL file or a folder of them (`split_files`), each file in its own
shape. Parsing is structural only (is each line a JSON object of a known shape, with string contents?) and
reads one line at a time, so a multi-gigabyte or binary file is reported on, not read into memory. What the
rows say, and whether a conversation's turns make sense, is judged by `tasks/validate.py`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from llmops.errors import LLMOpsError

Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Each accepted row shape, with a one-line example (the error for a row of no known shape lists them).
FORMATS = {
    "messages": '{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}',
    "sharegpt": '{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}',
    "prompt_response": '{"prompt": "...", "response": "..."}',
    "prompt_completion": '{"prompt": "...", "completion": "..."}',
    "alpaca": '{"instruction": "...", "input": "..." (optional), "output": "..."}',
}
_BOM = b"\xef\xbb\xbf"
MAX_PROBLEMS_KEPT = 1000  # a binary file read as lines has a problem on every one: count them all, keep these

RowId = int | str  # where a row is: its line in a one-file split, "<file name>:<line>" in a folder split


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str
    # An assistant turn with train=False is context: rendered as it is, never a target (OpenAI's "weight": 0).
    train: bool = True

    def as_message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """A chat: turns of the system, the user and the assistant. A clean one (what trains) has its system turn
    first, if any, and ends on an assistant turn; `structure_problem` says what else a row may hold."""

    turns: tuple[Turn, ...]

    @classmethod
    def from_pair(cls, prompt: str, response: str, system: str | None = None) -> Conversation:
        head = (Turn("system", system),) if system is not None else ()
        return cls(head + (Turn("user", prompt), Turn("assistant", response)))

    @property
    def prompt(self) -> tuple[Turn, ...]:
        """Everything before the last assistant turn: what a model is given to answer."""
        return self.turns[: self._last_assistant()]

    @property
    def reference(self) -> str:
        """The last assistant turn: the answer evaluation compares a generation with."""
        last = self._last_assistant()
        return self.turns[last].content if last < len(self.turns) else ""

    @property
    def last_user(self) -> str:
        return next((t.content for t in reversed(self.prompt) if t.role == "user"), "")

    @property
    def opening_assistant_turns(self) -> int:
        """How many assistant turns come before the first user turn (a chat cut mid-way, an agent's greeting)."""
        count = 0
        for turn in self.turns:
            if turn.role == "user":
                break
            count += turn.role == "assistant"
        return count

    def without_opening_assistant_turns(self) -> Conversation:
        """The conversation from its first user turn on (its system turn kept)."""
        first_user = next((i for i, t in enumerate(self.turns) if t.role == "user"), len(self.turns))
        return Conversation(tuple(t for i, t in enumerate(self.turns) if i >= first_user or t.role == "system"))

    def _last_assistant(self) -> int:
        """Index of the last assistant turn (len(turns) when there is none: everything is prompt)."""
        return max((i for i, t in enumerate(self.turns) if t.role == "assistant"), default=len(self.turns))

    def key(self, turns: Sequence[Turn] | None = None) -> str:
        """Hash of the normalized conversation (or of `turns`): whitespace runs collapsed, ends stripped."""
        return _key([(t.role, " ".join(t.content.split())) for t in (self.turns if turns is None else turns)])

    def keys(self) -> tuple[str, str]:
        """`key()` and `key(prompt)`, normalizing the text once."""
        normal = [(t.role, " ".join(t.content.split())) for t in self.turns]
        return _key(normal), _key(normal[: self._last_assistant()])

    def to_row(self) -> dict[str, Any]:
        """The `messages` row; an untrained assistant turn carries `"weight": 0`."""
        return {"messages": [t.as_message() | ({} if t.train else {"weight": 0}) for t in self.turns]}


def _key(normal: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(normal).encode()).hexdigest()


# Why a conversation cannot train, whatever the chat template (the reasons cleaning counts its drops under).
STRUCTURE_PROBLEMS = {
    "system_not_first": "a system turn after the first turn",
    "no_assistant_turn": "no assistant turn: nothing to learn from",
    "ends_on_user_turn": "ends on a user turn (its last question has no answer)",
    "no_trained_turn": 'every assistant turn has "weight": 0: nothing to learn from',
}


def structure_problem(conversation: Conversation) -> str | None:
    """The STRUCTURE_PROBLEMS reason that makes this conversation unusable for training, or None.

    Opening assistant turns are not one of them: the chat template decides (`tasks/validate.py` renders the
    conversation as it is, or repairs it by dropping them)."""
    turns = conversation.turns
    if any(t.role == "system" for t in turns[1:]):
        return "system_not_first"
    if not any(t.role == "assistant" for t in turns):
        return "no_assistant_turn"
    if turns[-1].role != "assistant":
        return "ends_on_user_turn"
    if not any(t.train for t in turns if t.role == "assistant"):
        return "no_trained_turn"
    return None


@dataclass(frozen=True)
class RowProblem:
    line: int  # 0 for a problem of the whole file
    problem: str
    file: str | None = None  # the file's name, in a folder split

    def __str__(self) -> str:
        if self.file:
            return f"{self.file}:{self.line}: {self.problem}" if self.line else f"{self.file}: {self.problem}"
        return f"line {self.line}: {self.problem}" if self.line else self.problem


@dataclass
class ParsedFile:
    """What a JSONL file (or a folder split) holds: its detected format, the conversations with where they
    are, and what is structurally wrong (line by line)."""

    format: str | None = None
    rows: list[tuple[RowId, Conversation]] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)


def split_files(path: Path) -> list[Path]:
    """The files of a split: the JSONL file itself, or the `*.jsonl` files directly inside a folder, sorted by
    name (hidden ones, such as a write in progress, left out).

    Raises:
        LLMOpsError: the path does not exist, or is a folder without JSONL files.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LLMOpsError(
            f"Dataset {path} not found. Check the path (data.train / data.eval in params.yaml): a JSONL file, or "
            "a folder of them."
        )
    files = sorted(p for p in path.glob("*.jsonl") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise LLMOpsError(f"Dataset folder {path} holds no *.jsonl files. Put the split's JSONL files directly in it.")
    return files


class JsonlReader:
    """The rows of one JSONL file, read one line at a time: iterate it for `(where, conversation)`; what is
    structurally wrong collects in `problems` (the first MAX_PROBLEMS_KEPT; `problem_count` counts all).

    The format is detected from the first row of a known shape; a row of another shape is a problem (one
    file, one format). A UTF-8 byte-order mark and CRLF line ends are accepted. `label` (a folder split's file
    name) makes each row's place `"<label>:<line>"` instead of its line number.
    """

    def __init__(self, path: Path, max_line_bytes: int = 1_000_000, label: str | None = None):
        if not path.is_file():
            raise LLMOpsError(f"Dataset file {path} not found. Check the path (data.train / data.eval in params.yaml).")
        self.path, self.max_line_bytes, self.label = path, max_line_bytes, label
        self.format: str | None = None
        self.problems: list[RowProblem] = []
        self.problem_count = 0
        self.rows_read = 0
        self.bytes_read = 0  # for progress on a large file

    def _problem(self, line: int, problem: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(RowProblem(line, problem, self.label))

    def __iter__(self) -> Iterator[tuple[RowId, Conversation]]:
        with self.path.open("rb") as handle:
            head = handle.read(8192).removeprefix(_BOM)
        if not head.strip():
            self._problem(0, "the file is empty")
        elif head.startswith((b"\xff\xfe", b"\xfe\xff")):
            self._problem(0, "the file is UTF-16 encoded; save it as UTF-8")
        elif b"\x00" in head:
            self._problem(0, "the file is binary, not JSON Lines text")
        elif head.lstrip().startswith(b"["):
            message = (
                "the file is one JSON array; JSON Lines needs one object per line (convert it with: jq -c '.[]' FILE)"
            )
            self._problem(0, message)
        if self.problems:
            return
        first_line = 0
        limit = self.max_line_bytes
        with self.path.open("rb") as handle:
            number = 0
            while raw := handle.readline(limit + 1):
                number += 1
                self.bytes_read += len(raw)
                if len(raw) > limit:
                    while raw and not raw.endswith(b"\n"):  # skip the rest of the over-long line unread
                        raw = handle.readline(limit)
                    self._problem(number, f"longer than validate.max_line_bytes={limit}")
                    continue
                raw = raw.removeprefix(_BOM) if number == 1 else raw
                if not raw.strip():
                    continue
                row, shape, problem = _parse_line(raw, truncated=not raw.endswith(b"\n"), expected=self.format)
                if shape and self.format is None:
                    self.format, first_line = shape, number
                elif shape and shape != self.format:
                    problem = (
                        f"a row in the {shape} shape, but the file's format is {self.format} (detected from line "
                        f"{first_line}); one file holds one format: convert the file to a single shape"
                    )
                    row = None
                if problem:
                    self._problem(number, problem)
                elif row is not None:
                    self.rows_read += 1
                    yield (f"{self.label}:{number}" if self.label else number), row


def split_readers(path: Path, max_line_bytes: int = 1_000_000) -> list[JsonlReader]:
    """One reader per file of the split (`split_files`); a folder split's rows are named `<file>:<line>`."""
    files = split_files(path)
    folder = path.is_dir()
    return [JsonlReader(f, max_line_bytes, f.name if folder else None) for f in files]


def parse_jsonl(path: Path, max_line_bytes: int = 1_000_000) -> ParsedFile:
    """Read every row of a split (a file, or a folder of them) with where it is, collecting what is
    structurally wrong instead of stopping. The format is the file's; a folder's is its files' formats,
    joined with "+" when they differ.

    Raises:
        LLMOpsError: the file or folder does not exist (or the folder holds no JSONL file).
    """
    parsed = ParsedFile()
    formats = []
    for reader in split_readers(path, max_line_bytes):
        parsed.rows.extend(reader)
        parsed.problems.extend(reader.problems)
        formats.append(reader.format)
    parsed.format = "+".join(dict.fromkeys(f for f in formats if f)) or None
    return parsed


def detect_shape(row: dict[str, Any], expected: str | None = None) -> str | None:
    """Which accepted shape a row's keys say it is in (None: no known shape)."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "completion" in row:
        return "prompt_completion"
    if "response" in row:
        return "prompt_response"
    if "prompt" in row:  # a prompt alone: the shape the file has, with a field missing
        return expected if expected in ("prompt_response", "prompt_completion") else "prompt_response"
    return None


def _parse_line(
    raw: bytes, truncated: bool, expected: str | None
) -> tuple[Conversation | None, str | None, str | None]:
    """(conversation, shape, problem) of one line."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, None, "not valid UTF-8"
    except json.JSONDecodeError as exc:
        hint = " (the file looks truncated)" if truncated else ""
        return None, None, f"not valid JSON ({exc.msg}){hint}"
    if not isinstance(row, dict):
        return None, None, f"expected a JSON object, got {type(row).__name__}"
    shape = detect_shape(row, expected)
    if shape is None:
        accepted = "; ".join(f"{name}: {example}" for name, example in FORMATS.items())
        return None, None, f"a row of no known shape (keys: {', '.join(sorted(row)) or 'none'}); accepted: {accepted}"
    if shape != expected and expected is not None:
        return None, shape, None  # the caller reports the mix
    try:
        return _READERS[shape](row), shape, None
    except ValueError as exc:
        return None, shape, str(exc)


def _pair(row: dict[str, Any], prompt_key: str, response_key: str) -> Conversation:
    fields = (prompt_key, response_key)
    missing = [key for key in fields if row.get(key) is None]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    wrong = [f"{key} is {type(row[key]).__name__}" for key in fields if not isinstance(row[key], str)]
    if wrong:
        raise ValueError(f"fields must be strings ({', '.join(wrong)})")
    return Conversation.from_pair(row[prompt_key], row[response_key])


def _alpaca(row: dict[str, Any]) -> Conversation:
    missing = [key for key in ("instruction", "output") if row.get(key) is None]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    extra = row.get("input") or ""
    wrong = [f"{k} is {type(v).__name__}" for k, v in (("instruction", row["instruction"]), ("input", extra),
             ("output", row["output"])) if not isinstance(v, str)]  # fmt: skip
    if wrong:
        raise ValueError(f"fields must be strings ({', '.join(wrong)})")
    prompt = f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]
    return Conversation.from_pair(prompt, row["output"])


def _turns(items: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> Conversation:
    """The turns as written. Only what no reading could fix is an error here (not a list of objects, an
    unknown role, content that is not text, a weight other than 0 or 1): the order of the turns is for
    cleaning to judge, row by row (`structure_problem`)."""
    if not isinstance(items, list) or not items:
        raise ValueError(f"{key} must be a non-empty list of turns")
    turns = []
    for index, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ValueError(f"{key} turn {index} is {type(item).__name__}, expected an object")
        role, content, weight = item.get(role_key), item.get(content_key), item.get("weight", 1)
        if role not in roles:
            raise ValueError(
                f"{key} turn {index} has unknown {role_key} {role!r} (accepted: {', '.join(sorted(roles))})"
            )
        if not isinstance(content, str):
            raise ValueError(f"{key} turn {index}: {content_key} is {type(content).__name__}, must be a string")
        if weight not in (0, 1) or isinstance(weight, float):
            raise ValueError(f"{key} turn {index}: weight is {weight!r}, must be 0 (context only) or 1 (trains)")
        turns.append(Turn(roles[role], content, train=weight == 1))
    return Conversation(tuple(turns))


_READERS = {
    "messages": lambda row: _turns(row["messages"], "messages", "role", "content", {r: r for r in ROLES}),
    "sharegpt": lambda row: _turns(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES),
    "prompt_response": lambda row: _pair(row, "prompt", "response"),
    "prompt_completion": lambda row: _pair(row, "prompt", "completion"),
    "alpaca": _alpaca,
}


def read_conversations(path: Path) -> list[Conversation]:
    """Read a split (a file or a folder) that is known to be valid (it passed the validate stage), in any
    accepted shape."""
    parsed = parse_jsonl(path)
    if parsed.problems:
        raise LLMOpsError(f"{path} has malformed rows ({parsed.problems[0]}); run `llmops validate --data {path}`.")
    return [conversation for _, conversation in parsed.rows]


def write_jsonl(path: Path, conversations: Sequence[Conversation]) -> None:
    """Write conversations in the `messages` shape."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(json.dumps(conversation.to_row(), ensure_ascii=False) + "\n")


class DatasetRef(BaseModel, frozen=True):
    """A validated dataset: the cleaned splits that train and evaluate, and the raw files they came from.

    Lineage records both: the raw data's DVC version (or content hash) and the cleaned splits' hashes.
    """

    train: Path  # the cleaned training split (what trains)
    eval: Path  # the cleaned eval split
    train_rows: int
    eval_rows: int
    train_md5: str  # of the cleaned files
    eval_md5: str
    raw_train: Path | None = None  # the files as given (the cleaned ones when nothing changed)
    raw_eval: Path | None = None
    raw_train_md5: str | None = None
    raw_eval_md5: str | None = None
    dropped: dict[str, int] = {}  # rows removed by cleaning, by reason, both splits
    repaired: dict[str, int] = {}  # rows cleaning mended (e.g. opening assistant turns dropped), by kind
    chat_template: str | None = None  # data.chat_template's Jinja text, when set
    dvc_file: Path | None = None  # the .dvc file tracking the training data, when it is DVC-tracked
    dvc_version: str | None = None  # the hash that .dvc file records

    @property
    def digest(self) -> str:
        """The dataset's version for lineage: DVC's hash when tracked, else the two raw splits' content hashes."""
        train, eval_ = self.raw_train_md5 or self.train_md5, self.raw_eval_md5 or self.eval_md5
        return self.dvc_version or f"{train[:16]}{eval_[:16]}"

    @classmethod
    def unvalidated(cls, train: Path, eval: Path) -> DatasetRef:
        """Splits taken as they are, without cleaning or the suite: for data a benchmark or a GPU check made
        itself, on hosts that may not have Great Expectations."""
        return cls(
            train=train,
            eval=eval,
            train_rows=len(read_conversations(train)),
            eval_rows=len(read_conversations(eval)),
            train_md5=split_md5(train),
            eval_md5=split_md5(eval),
        )

    def lineage_tags(self) -> dict[str, str]:
        return {
            "dataset.train": str(self.raw_train or self.train),
            "dataset.eval": str(self.raw_eval or self.eval),
            "dataset.version": self.digest,
            "dataset.dvc_file": str(self.dvc_file or ""),
            "dataset.train_rows": str(self.train_rows),
            "dataset.eval_rows": str(self.eval_rows),
            "dataset.cleaned_train_md5": self.train_md5,
            "dataset.cleaned_eval_md5": self.eval_md5,
            "dataset.dropped": json.dumps(self.dropped, sort_keys=True),
            "dataset.repaired": json.dumps(self.repaired, sort_keys=True),
            "dataset.validation": "passed",
        }


# The hourly files of the served-traffic log (`llmops.serving.traffic_log`): never a batch, since only judged exchanges
# may train.
TRAFFIC_FILES, FEEDBACK_FILES = "traffic-????-??-??T??.jsonl", "feedback-????-??-??T??.jsonl"


# Judged traffic held out for evaluation (`loop.eval_share`): a file beside the training split, in the folder DVC
# versions with it. It never trains; the gate compares candidate and champion on it.
TRAFFIC_EVAL_FILE = "traffic-eval.jsonl"


def traffic_eval_split(train: Path) -> Path:
    """Where the traffic eval split of the training split `train` (a file or a folder) lives."""
    return train.parent / TRAFFIC_EVAL_FILE


def batch_files(path: Path) -> list[Path]:
    """An incoming batch: the JSONL file itself, or the `*.jsonl` files directly inside a folder (sorted),
    leaving out a served-traffic log's files."""
    if path.is_file():
        if path.match(TRAFFIC_FILES) or path.match(FEEDBACK_FILES):
            raise LLMOpsError(
                f"{path} is a file of the served-traffic log: its answers were never judged, so it is not a batch "
                f"to train on. Give its folder ({path.parent}), from which only judged exchanges are taken."
            )
        return [path]
    if not path.is_dir():
        raise LLMOpsError(f"Incoming data {path} does not exist: give a JSONL file or a folder of them.")
    log_files = {*path.glob(TRAFFIC_FILES), *path.glob(FEEDBACK_FILES)}
    return sorted(p for p in path.glob("*.jsonl") if p.is_file() and p not in log_files)


def file_md5(path: Path) -> str:
    """MD5 of the file's bytes: the same hash DVC records for a tracked file."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_md5(path: Path) -> str:
    """A split's content hash: the file's MD5, or for a folder the MD5 of its files' names and MD5s (so a
    renamed, added or changed file changes it)."""
    if path.is_file():
        return file_md5(path)
    listing = "".join(f"{f.name} {file_md5(f)}\n" for f in split_files(path))
    return hashlib.md5(listing.encode()).hexdigest()


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
