"""Traffic-log rows as `llmops serve` writes them (the format in the module docstring of `llmops.serving.traffic_log`),
written directly so the reader's tests do not depend on the writer."""

from __future__ import annotations

import json
from pathlib import Path

HOUR = "2026-12-05T04"


def answer_id(n: int, hour: str = HOUR) -> str:
    return f"chatcmpl-{hour.replace('-', '').replace(':', '')}-{n:016x}"


def served(n: int, messages: list[dict[str, str]] | str, answer: str, version: str = "1") -> dict:
    """One answer row: `messages` is only what the client sent (a string: one user turn)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return {"id": answer_id(n), "messages": messages, "answer": answer, "model": "llmops-demo", "version": version,
            "latency_ms": 12.0, "timestamp": f"{HOUR}:00:{n % 60:02d}.000+00:00"}  # fmt: skip


def judged(n: int, rating: str | None = "up", correction: str | None = None, role: str = "reviewer") -> dict:
    return {"id": answer_id(n), "rating": rating, "correction": correction, "role": role, "by": "0123456789ab",
            "user": None, "timestamp": f"{HOUR}:30:{n % 60:02d}.000+00:00"}  # fmt: skip


def write_log(folder: Path, rows: list[dict], judgments: list[dict], hour: str = HOUR) -> Path:
    """Append the rows and judgments to the hour's files under `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in ((f"traffic-{hour}.jsonl", rows), (f"feedback-{hour}.jsonl", judgments)):
        with (folder / name).open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(item) + "\n" for item in items)
    return folder
