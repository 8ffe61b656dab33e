"""`make bench ONLY=monitor`: a drift check's time stays flat as the training set and the traffic log grow.

The same check (`tasks.drift.detect_traffic_drift`) runs on a training set and a traffic log of one size, then
on ten times both: ten times the training rows, and ten times the hours of log (each hour as full). With
`monitor.reference_rows` (a seeded sample of the training rows) and `monitor.window_hours` (only the last
hours' files are opened), the second check should take about as long as the first (goal: <= 1.5x).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from llmops.config import MonitorParams
from llmops.data import Conversation, write_jsonl
from tasks.drift import detect_traffic_drift

THINGS = ["zebra", "okapi", "tiger", "shovel", "kettle", "violin", "tractor", "lantern", "pebble", "cactus"]


def _training_set(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    write_jsonl(
        path,
        [
            Conversation.from_pair(f"What color is the {rng.choice(THINGS)} number {i}?", rng.choice(THINGS))
            for i in range(rows)
        ],
    )
    return path


def _traffic_log(folder: Path, hours: int, per_hour: int, now: datetime) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(hours)
    for back in range(hours):
        hour = now - timedelta(hours=back)
        lines = []
        for n in range(per_hour):
            stamp = (hour - timedelta(minutes=rng.randint(0, 59))).isoformat()
            question = f"Which {rng.choice(THINGS)} sings number {n}?"
            row = {"id": f"chatcmpl-{hour:%Y%m%dT%H}-{n:016x}", "answer": "grey", "version": "1", "timestamp": stamp,
                   "messages": [{"role": "user", "content": question}]}  # fmt: skip
            lines.append(json.dumps(row) + "\n")
        (folder / f"traffic-{hour:%Y-%m-%dT%H}.jsonl").write_text("".join(lines))
    return folder


def monitor_figures(model: Path, work: Path, rows: int = 4000, hours: int = 24, per_hour: int = 20) -> list[dict]:
    """One row: the check's time on 10x the data and the log over its time on 1x (median of 2 runs each)."""
    params = MonitorParams()
    now = datetime.now(UTC).replace(minute=59)
    seconds = {}
    for scale in (1, 10):
        folder = work / f"monitor-x{scale}"
        reference = _training_set(folder / "train.jsonl", rows * scale, seed=scale)
        traffic = _traffic_log(folder / "traffic", hours * scale, per_hour, now)
        runs = []
        for attempt in range(2):
            start = time.perf_counter()
            detect_traffic_drift(params, reference, traffic, "1", model, folder / f"out-{attempt}", device="cpu")
            runs.append(time.perf_counter() - start)
        seconds[scale] = statistics.median(runs)
    return [
        {
            "name": "monitor_check_10x",
            "ours": seconds[10],
            "baseline": seconds[1],
            "unit": "s",
            "detail": f"drift check on {rows * 10} training rows + {hours * 10} h of traffic vs {rows} rows + "
            f"{hours} h ({per_hour} requests/h; monitor.window_hours={params.window_hours}, "
            f"reference_rows={params.reference_rows}); goal <= 1.5x",
        }
    ]
