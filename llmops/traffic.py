"""Served traffic as data: what `llmops serve` logs, and what the monitor and the retrain read back.

The server appends each exchange, redacted, in the chat `messages` shape to an hourly file under the
monitor's incoming folder (`<monitor.incoming>/traffic/traffic-YYYY-MM-DDTHH.jsonl`), with the response id,
the version that answered, latency and time; `POST /v1/feedback` appends judgments beside it
(`feedback-*.jsonl`). Two readers:
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
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    """The writer: hourly files of exchanges and of feedback on them. The hour is part of each response id,
    so feedback finds its exchange without an index."""

    def __init__(self, folder: Path, sample_rate: float, max_bytes: int):
        self.folder, self.sample_rate, self.max_bytes = folder, sample_rate, max_bytes
        self._lock = threading.Lock()

    @staticmethod
    def new_id(prefix: str, now: datetime) -> str:
        return f"{prefix}-{now:%Y%m%dT%H}-{uuid.uuid4().hex[:16]}"

    def _files(self, response_id: str) -> tuple[Path, Path] | None:
        try:
            hour = datetime.strptime(response_id.split("-")[1], "%Y%m%dT%H")
        except (IndexError, ValueError):
            return None
        stamp = f"{hour:%Y-%m-%dT%H}"
        return self.folder / f"traffic-{stamp}.jsonl", self.folder / f"feedback-{stamp}.jsonl"

    def append(self, response_id: str, messages: list[dict[str, str]], answer: str, **facts: Any) -> bool:
        """Write one exchange (redacted) unless sampled out or over the hour's size cap; True if written."""
        if random.random() >= self.sample_rate:
            return False
        traffic, _ = self._files(response_id)
        turns = [*messages, {"role": "assistant", "content": answer}]
        row = {"id": response_id, "messages": [{"role": m["role"], "content": redact(m["content"])} for m in turns]}
        line = json.dumps({**row, **facts}, ensure_ascii=False) + "\n"
        with self._lock:
            size = traffic.stat().st_size if traffic.exists() else 0
            if size + len(line.encode()) > self.max_bytes:
                log.warning("%s reached serve.max_log_bytes (%d bytes); %s not logged", traffic, size, response_id)
                return False
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with traffic.open("a", encoding="utf-8") as handle:
                    handle.write(line)
            except OSError as exc:  # a full or read-only disk loses a log row, never the user's answer
                log.error("cannot write the traffic log %s: %s; %s not logged", traffic, exc, response_id)
                return False
        return True

    def feedback(self, response_id: str, rating: str, correction: str | None) -> bool:
        """Attach a judgment to a logged exchange; False when no exchange with that id was logged."""
        files = self._files(response_id)
        if files is None or not files[0].exists():
            return False
        traffic, feedback = files
        needle = f'"id": {json.dumps(response_id)}'
        with self._lock:
            with traffic.open(encoding="utf-8") as handle:
                if not any(line.startswith("{" + needle) for line in handle):
                    return False
            row = {
                "id": response_id,
                "rating": rating,
                "correction": redact(correction) if correction is not None else None,
                "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            with feedback.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
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
