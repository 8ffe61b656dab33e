"""Two `llmops run` started together on this host, against one alone: the trainings, and the merge-quantize and
evaluate stages, take turns for the host's slot (`finetune.host_slots`, one on a CPU host) instead of sharing
the cores and thrashing.

Each run has its own params file, work folder and MLflow store (`make_params`), so nothing but the host is
shared: both train, neither finds the other's cache or checkpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _command(params: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("llmops")), "--params", str(params), "run", "--json"]


def _training(folder: Path) -> dict:
    """What the run's training process recorded (tokens/s, when it trained)."""
    (metadata,) = folder.glob("work/runs/*/finetune/llmops_metadata.json")
    return json.loads(metadata.read_text())


def two_runs_figures(make_params: Callable[[Path], Path], folder: Path) -> list[dict]:
    start = time.perf_counter()
    subprocess.run(_command(make_params(folder / "alone")), check=True, capture_output=True)
    alone = time.perf_counter() - start

    start = time.perf_counter()
    runs = [
        subprocess.Popen(_command(make_params(folder / name)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name in ("first", "second")
    ]
    for run in runs:
        _, error = run.communicate()
        if run.returncode:
            raise RuntimeError(f"llmops run exited {run.returncode}: {error.decode()[-2000:]}")
    together = time.perf_counter() - start

    one = _training(folder / "alone")
    first, second = sorted((_training(folder / n) for n in ("first", "second")), key=lambda t: t["started_at"])
    overlap = max(0.0, first["finished_at"] - second["started_at"])
    return [
        {
            "name": "two_runs",
            "ours": together,
            "baseline": alone,
            "unit": "s",
            "detail": f"wall clock until both of two `llmops run` started together have finished vs one alone "
            f"(target: at most 2.3x), each with its own work folder and store, demo data, tiny model; "
            f"training {first['tokens_per_second']:.0f} and {second['tokens_per_second']:.0f} tokens/s "
            f"({first['threads']} threads each) vs {one['tokens_per_second']:.0f} alone, trainings overlapping "
            f"{overlap:.1f} s (one slot per CPU host, held by training, merge-quantize and evaluate; before: "
            "trainings at once, ~420 tokens/s each; with the slot around training only, 2.60x)",
        }
    ]
