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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from llmops.data import FEEDBACK_FILES, TRAFFIC_FILES, Conversation, Turn
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


def _rows(folder: Path, pattern: str) -> Iterator[dict[str, Any]]:
    for path in sorted(folder.glob(pattern)):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a row cut short by a crash or a full disk: the rest still counts
                log.warning("%s:%d is not a whole JSON row; skipped", path, number)


def _turns(messages: list[dict[str, str]]) -> tuple[Turn, ...]:
    return tuple(Turn(m["role"], m["content"]) for m in messages)


def served_prompts(folder: Path, version: str) -> list[tuple[Turn, ...]]:
    """The prompts `version` answered: each logged conversation without the answer."""
    return [_turns(row["messages"][:-1]) for row in _rows(folder, TRAFFIC_FILES) if str(row.get("version")) == version]


@dataclass(frozen=True)
class JudgedTraffic:
    rows: list[Conversation]  # fit to train on, each once
    left_out: int  # exchanges never judged, or judged "down" with no correction
    duplicates: int  # judged exchanges the training set, or an earlier exchange, already holds

    @property
    def folded(self) -> int:
        return len(self.rows)


def judged_traffic(folder: Path, known: AbstractSet[str] = frozenset()) -> JudgedTraffic:
    """The traffic worth training on, as conversations, leaving out any whose `Conversation.key()` is in
    `known` (the training set's). The latest judgment of a response wins."""
    judgments = {row["id"]: row for row in _rows(folder, FEEDBACK_FILES)}
    rows: dict[str, Conversation] = {}
    left_out = duplicates = 0
    for exchange in _rows(folder, TRAFFIC_FILES):
        judgment = judgments.get(exchange["id"], {})
        messages = exchange["messages"]
        if judgment.get("correction"):
            messages = [*messages[:-1], {"role": "assistant", "content": judgment["correction"]}]
        elif judgment.get("rating") != "up":
            left_out += 1
            continue
        conversation = Conversation(_turns(messages))
        if conversation.key() in known or conversation.key() in rows:
            duplicates += 1
        else:
            rows[conversation.key()] = conversation
    return JudgedTraffic(rows=list(rows.values()), left_out=left_out, duplicates=duplicates)
