"""Served traffic as data: what `llmops serve` logs, and what the monitor and the retrain read back.

The server appends one row per answer, redacted, to an hourly file under the monitor's incoming folder
(`<monitor.incoming>/traffic/traffic-YYYY-MM-DDTHH.jsonl`): `{"id", "messages", "answer", "model", "version",
"latency_ms", "timestamp"}`, where `messages` is only what the client sent (context) and `answer` the only
text the server wrote; each prompt of a multi-prompt request is its own row with its own id (`<response
id>-<index>`). `POST /v1/feedback` appends judgments beside it (`feedback-*.jsonl`): `{"id", "rating",
"correction", "role": "reviewer"|"user", "by": <key hash>, "user": <end-user id>, "timestamp"}`. Legacy rows
have no `answer` (their last message is the answer) and legacy feedback no `role`. Two readers:
- `served_prompts`: what users asked one version, the monitor's view of traffic. Never the answers: the
  model's perplexity on its own output says nothing about drift.
- `judged_traffic`: the exchanges fit to train on. A correction becomes the assistant turn, an "up" rating
  keeps the answer, anything else is left out, so the model never learns from its own unjudged output.

The log is append-only and never moved: the drift window is the traffic of the current champion, and a row
already folded into the training set is recognised by its content, so it is folded once.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from llmops.config import LoopParams
from llmops.data import FEEDBACK_FILES, ROLES, TRAFFIC_FILES, Conversation, Turn
from llmops.privacy import redact

log = logging.getLogger(__name__)

TRAFFIC_FOLDER = "traffic"  # the log's folder inside monitor.incoming


def traffic_log(incoming: Path) -> Path | None:
    """The traffic log of an incoming folder (`<incoming>/traffic`), `incoming` itself if it is one, or None."""
    for folder in (incoming, incoming / TRAFFIC_FOLDER):
        if folder.is_dir() and any(folder.glob(TRAFFIC_FILES)):
            return folder
    return None


class TrafficLog:
    """The writer: hourly files of answers and of feedback on them, one row per answer (the row format is in
    the module docstring). The hour is part of each answer id, so feedback finds its file without an index;
    the ids this process logged are also kept in memory (the latest `index_size`), so feedback on them never
    reads the file. Redaction and file work run on the caller's thread: the server calls these off its event
    loop."""

    def __init__(self, folder: Path, sample_rate: float, max_bytes: int, index_size: int = 100_000):
        self.folder, self.sample_rate, self.max_bytes, self.index_size = folder, sample_rate, max_bytes, index_size
        self._lock = threading.Lock()  # held only to append a line, never to read a file
        self._logged: OrderedDict[str, None] = OrderedDict()  # ids written by this process, oldest first

    @staticmethod
    def new_id(prefix: str, now: datetime) -> str:
        return f"{prefix}-{now:%Y%m%dT%H}-{uuid.uuid4().hex[:16]}"

    @staticmethod
    def answer_id(response_id: str, index: int) -> str:
        """The id of one answer of a multi-prompt request: the response's id and the choice's index."""
        return f"{response_id}-{index}"

    def _files(self, answer_id: str) -> tuple[Path, Path] | None:
        try:
            hour = datetime.strptime(answer_id.split("-")[1], "%Y%m%dT%H")
        except (IndexError, ValueError):
            return None
        stamp = f"{hour:%Y-%m-%dT%H}"
        return self.folder / f"traffic-{stamp}.jsonl", self.folder / f"feedback-{stamp}.jsonl"

    def append(self, answer_id: str, messages: list[dict[str, str]], answer: str, **facts: Any) -> bool:
        """Write one answer (redacted): `messages` as the client sent them, `answer` as the server generated
        it. Skipped when sampled out or over the hour's size cap; True if written."""
        if random.random() >= self.sample_rate:
            return False
        files = self._files(answer_id)
        if files is None:
            raise ValueError(f"{answer_id!r} is not an id made by TrafficLog.new_id")
        traffic = files[0]
        row = {
            "id": answer_id,
            "messages": [{"role": m["role"], "content": redact(m["content"])} for m in messages],
            "answer": redact(answer),
        }
        line = json.dumps({**row, **facts}, ensure_ascii=False) + "\n"
        with self._lock:
            size = traffic.stat().st_size if traffic.exists() else 0
            if size + len(line.encode()) > self.max_bytes:
                log.warning("%s reached serve.max_log_bytes (%d bytes); %s not logged", traffic, size, answer_id)
                return False
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with traffic.open("a", encoding="utf-8") as handle:
                    handle.write(line)
            except OSError as exc:  # a full or read-only disk loses a log row, never the user's answer
                log.error("cannot write the traffic log %s: %s; %s not logged", traffic, exc, answer_id)
                return False
            self._logged[answer_id] = None
            if len(self._logged) > self.index_size:
                self._logged.popitem(last=False)
        return True

    def logged(self, answer_id: str) -> bool:
        """Whether an answer with this id is in the log: from memory for the ids this process wrote, else (an
        id from before a restart, or one evicted from memory) by reading its hour's file, without the lock."""
        if answer_id in self._logged:
            return True
        files = self._files(answer_id)
        if files is None or not files[0].exists():
            return False
        needle = "{" + f'"id": {json.dumps(answer_id)},'
        with files[0].open(encoding="utf-8") as handle:
            return any(line.startswith(needle) for line in handle)

    def feedback(
        self,
        answer_id: str,
        rating: str | None,
        correction: str | None,
        *,
        role: Literal["reviewer", "user"] = "reviewer",
        by: str | None = None,
        user: str | None = None,
    ) -> bool:
        """Attach a judgment to a logged answer; False when no answer with that id was logged. `by` is a short
        hash of the key that sent it (never the key), `user` the end-user id the client named. A correction is
        a reviewer's only: the server checks the key; this refuses a user's correction outright."""
        if correction is not None and role != "reviewer":
            raise ValueError("a correction is only ever written with role 'reviewer'")
        if not self.logged(answer_id):
            return False
        row = {
            "id": answer_id,
            "rating": rating,
            "correction": redact(correction) if correction is not None else None,
            "role": role,
            "by": by,
            "user": user,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock, self._files(answer_id)[1].open("a", encoding="utf-8") as handle:
            handle.write(line)
        return True


def _rows(folder: Path, pattern: str, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """The rows of the hourly files, oldest first; with `since`, only the files of hours that end after it
    (the rest are never opened) and the rows stamped since then."""
    for path in sorted(folder.glob(pattern)):
        if since is not None and _hour(path) is not None and _hour(path) + timedelta(hours=1) <= since:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row cut short by a crash or a full disk: the rest still counts
                log.warning("%s:%d is not a whole JSON row; skipped", path, number)
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                if since is None or _stamp(row) is None or _stamp(row) >= since:
                    yield row
            else:
                log.warning("%s:%d is not a row of the traffic log (no id); skipped", path, number)


def _hour(path: Path) -> datetime | None:
    try:
        return datetime.strptime(path.stem.split("-", 1)[1], "%Y-%m-%dT%H").replace(tzinfo=UTC)
    except (IndexError, ValueError):
        return None


def _stamp(row: dict[str, Any]) -> datetime | None:
    try:
        stamp = datetime.fromisoformat(str(row.get("timestamp")))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def exchange(row: dict[str, Any]) -> tuple[tuple[Turn, ...], str] | None:
    """(the context the client sent, the answer the server wrote) of a logged row, or None when the row is
    malformed. A row with `answer` is the current shape: `messages` is all context. A legacy row has no
    `answer`: its last message is the server's, the rest context."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
    ):
        return None
    if "answer" not in row:
        if not messages or messages[-1]["role"] != "assistant":
            return None
        messages, answer = messages[:-1], messages[-1]["content"]
    else:
        answer = row["answer"]
        if not isinstance(answer, str):
            return None
    # Client-sent assistant turns are context only: never a target, whatever they say (`Turn.train`).
    context = tuple(Turn(m["role"], m["content"], train=m["role"] != "assistant") for m in messages)
    return context, answer


def served_prompts(folder: Path, version: str, since: datetime | None = None) -> list[tuple[Turn, ...]]:
    """The prompts `version` answered (since `since`, when given): each logged exchange's context, without
    the answer."""
    prompts = []
    for row in _rows(folder, TRAFFIC_FILES, since):
        if str(row.get("version")) == version and (found := exchange(row)) is not None:
            prompts.append(tuple(Turn(t.role, t.content) for t in found[0]))
    return prompts


# --- Judged traffic: what may train, once. ------------------------------------------------------------------

REVIEWER, USER = "reviewer", "user"
LEDGER = (
    "considered.tsv"  # beside the log: ids already considered, and what became of each (not *.jsonl: never a batch)
)


@dataclass(frozen=True)
class JudgedRow:
    id: str
    conversation: Conversation  # the context (never trained), then the one target
    source: str  # "correction" (a reviewer's text) | "answer" (the server's, rated up)
    role: str  # who judged it: reviewer | user


@dataclass(frozen=True)
class JudgedTraffic:
    rows: list[JudgedRow]  # fit to train on, in the log's order (oldest first)
    left_out: int  # never judged, judged "down" with no correction, or judged by someone whose judgment does not train
    unreadable: list[str]  # ids of judged exchanges whose log row is malformed (no answer to train on)
    considered_before: int  # judged exchanges an earlier ingest already considered (the ledger): skipped
    duplicates: int = 0  # judged exchanges `known` (the training set's keys) or an earlier exchange already holds

    @property
    def folded(self) -> int:
        return len(self.rows)


def _judgment(judgments: list[dict[str, Any]], loop: LoopParams) -> tuple[str, str, str | None] | None:
    """(target source, role, correction) of an exchange's judgments, or None when none trains. A reviewer's
    latest judgment overrides any user's; a user's counts only where the loop config lets it."""
    reviewed = [j for j in judgments if j.get("role") == REVIEWER]
    latest = (reviewed or judgments)[-1]
    role = REVIEWER if reviewed else USER  # legacy rows (no role) are a user's
    correction = latest.get("correction")
    if isinstance(correction, str) and correction.strip() and (role == REVIEWER or loop.user_corrections_train):
        return "correction", role, correction
    if latest.get("rating") == "up" and (role == REVIEWER or loop.user_ratings_train):
        return "answer", role, None
    return None


def judged_traffic(
    folder: Path,
    loop: LoopParams | None = None,
    known: AbstractSet[str] = frozenset(),
    considered: AbstractSet[str] = frozenset(),
) -> JudgedTraffic:
    """The traffic worth training on: each exchange whose judgment trains (see `LoopParams`) as a conversation
    of the context the client sent (assistant turns in it never trained) and ONE target, the reviewer's
    correction or the server's answer. Exchanges whose id is in `considered` (the ledger) are skipped, and any
    whose `Conversation.key()` is in `known`, or repeats an earlier one, is counted as a duplicate."""
    loop = loop or LoopParams()
    judgments: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(folder, FEEDBACK_FILES):
        judgments.setdefault(row["id"], []).append(row)
    rows: list[JudgedRow] = []
    seen: set[str] = set(known)
    left_out = considered_before = duplicates = 0
    unreadable: list[str] = []
    for row in _rows(folder, TRAFFIC_FILES):
        verdict = _judgment(judgments[row["id"]], loop) if row["id"] in judgments else None
        if verdict is None:
            left_out += 1
            continue
        if row["id"] in considered:
            considered_before += 1
            continue
        found = exchange(row)
        if found is None:
            unreadable.append(row["id"])
            continue
        context, answer = found
        source, role, correction = verdict
        conversation = Conversation((*context, Turn("assistant", correction if correction is not None else answer)))
        key = conversation.key()
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append(JudgedRow(row["id"], conversation, source, role))
    return JudgedTraffic(
        rows=rows, left_out=left_out, unreadable=unreadable, considered_before=considered_before, duplicates=duplicates
    )


def held_out(conversation: Conversation, share: float) -> bool:
    """Whether a judged exchange belongs to the traffic eval split (`loop.eval_share`): decided by a hash of its
    prompt, so the same question always lands on the same side and a held-out prompt never trains."""
    return int(conversation.keys()[1][:8], 16) < share * 16**8


def considered_ids(folder: Path) -> dict[str, str]:
    """The ledger: judged exchange id -> what became of it (folded, held_out, set_aside, already_there, or
    dropped:<reason>)."""
    ledger = folder / LEDGER
    if not ledger.is_file():
        return {}
    outcomes = {}
    for line in ledger.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            outcomes[fields[0]] = fields[1]
    return outcomes


def record_considered(folder: Path, outcomes: dict[str, str]) -> None:
    """Append to the ledger: these judged exchanges were considered, and what became of each. Written after
    the dataset is versioned, so a crash before it leaves them to be considered again, never lost."""
    if not outcomes:
        return
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with (folder / LEDGER).open("a", encoding="utf-8") as handle:
        handle.write("".join(f"{i}\t{outcome}\t{stamp}\n" for i, outcome in outcomes.items()))


def feedback_mark(folder: Path) -> str:
    """The traffic log's judged high-water mark: how many judgments, and the latest one's time. New feedback
    moves it; the monitor does not fire twice for the same mark and champion."""
    count, latest = 0, ""
    for row in _rows(folder, FEEDBACK_FILES):
        count += 1
        latest = max(latest, str(row.get("timestamp", "")))
    return f"{count}@{latest}"
