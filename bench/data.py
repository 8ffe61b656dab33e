"""`make bench ONLY=data`: `llmops validate` on ShareGPT-sized exports of 10,000 and 100,000 conversations.

The exports are generated (the real ShareGPT dump is not reachable here) to its shape: multi-turn
conversations of about 7 KB in the `conversations` shape, English text with some code, 30% opening with the
assistant (a conversation cut mid-way), 10% exact copies of earlier rows, 3% far longer than
`finetune.max_seq_len`. They are validated as a team would, through the command line, with the real
SmolLM2-135M-Instruct tokenizer and chat template. Each run is a fresh process; its wall time and peak
resident memory (the kernel's high-water mark, `wait4`) are the figures.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
EXPORTS = PROJECT / "work" / "bench-exports"  # kept across bench runs: 700 MB take a while to write
REAL_MODEL = PROJECT / "models" / "smollm2-135m-instruct"
BUDGET_SECONDS, BUDGET_MB = 180, 2048  # issue 22: 100,000 conversations in 3 minutes and 2 GB on 2 cores
GENERATOR_VERSION = 1  # bump when the export's content changes, so a kept one is not reused

_TEXT = (
    "the be to of and a in that have it for not on with he as you do at this but his by from they we say her she "
    "or an will my one all would there their what so up out if about who get which go me when make can like time "
    "no just him know take people into year your good some could them see other than then now look only come its "
    "over think also back after use two how our work first well way even new want because any these give day most "
    "system data model training function value error code file user question answer example result number list "
    "string return class import print problem solution method process information different following important "
    "python using used help need create include support provide case point part place world life hand state group"
)
WORDS = _TEXT.split()


def _paragraphs(rng: random.Random, count: int) -> list[str]:
    """A pool of paragraphs, some with a code block, to compose turns from (fast to write 700 MB)."""
    pool = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(2, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 22))]
            if rng.random() < 0.1:
                words.insert(rng.randrange(len(words)), str(rng.randint(2, 9999)))
            sentences.append(" ".join(words).capitalize() + rng.choice(".....?!:"))
        if rng.random() < 0.15:
            name = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}"
            body = f"return [v * y for v in x if v > {rng.randint(0, 99)}]"
            sentences.append(f"\n```python\ndef {name}(x, y=2):\n    {body}\n```\n")
        pool.append(" ".join(sentences))
    return pool


def sharegpt_export(rows: int, seed: int = 0) -> Path:
    """The export of `rows` conversations (generated once, then kept under work/bench-exports/)."""
    path = EXPORTS / f"sharegpt-{rows}-v{GENERATOR_VERSION}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(seed)
    pool = _paragraphs(rng, 4096)

    def text(chars: int, label: str) -> str:
        parts, size = [label], len(label)
        while size < chars:
            parts.append(rng.choice(pool))
            size += len(parts[-1]) + 2
        return "\n\n".join(parts)

    EXPORTS.mkdir(parents=True, exist_ok=True)
    kept: list[str] = []
    scratch = path.with_suffix(".partial")
    with scratch.open("w", encoding="utf-8") as out:
        for index in range(rows):
            if kept and rng.random() < 0.10:
                out.write(rng.choice(kept))
                continue
            size = 22_000 if rng.random() < 0.03 else 4_900
            exchanges = rng.randint(1, 5)
            turns = [{"from": "gpt", "value": text(300, "...")}] if rng.random() < 0.30 else []
            for turn in range(exchanges):
                asked = text(int(size / exchanges * rng.uniform(0.08, 0.4)), f"Question {index}.{turn}:")
                turns += [{"from": "human", "value": asked}]
                turns += [{"from": "gpt", "value": text(int(size / exchanges * rng.uniform(0.4, 1.1)), "Sure.")}]
            line = json.dumps({"id": f"conv-{index}", "conversations": turns}) + "\n"
            out.write(line)
            if len(kept) < 2000:
                kept.append(line)
    os.replace(scratch, path)
    return path


def bench_params(folder: Path) -> Path:
    """The shipped params with SmolLM2 as the base, and room for ShareGPT-sized conversations."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["model"]["base"] = str(REAL_MODEL)
    raw["finetune"]["max_seq_len"] = 4096
    raw["validate"].update(max_prompt_tokens=4096, max_response_tokens=4096, max_dropped_ratio=0.2)
    raw["work_dir"] = str(folder / "work")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder / "params.yaml"


def validate_once(params: Path, export: Path) -> tuple[float, float, dict]:
    """`llmops validate --json` in a fresh process: (wall seconds, peak resident MB, its JSON report)."""
    command = [sys.executable, "-m", "llmops.cli", "--params", str(params), "validate", "--data", str(export)]
    start = time.perf_counter()
    process = subprocess.Popen([*command, "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    report = json.loads(output.strip().splitlines()[-1])
    return seconds, usage.ru_maxrss / 1024, report


def validate_rows(work: Path) -> list[dict]:
    """The bench rows (`bench/run.py` makes them Figures): time and memory at 100,000, linearity from 10,000."""
    params = bench_params(work / "validate")
    runs = {}
    for rows in (10_000, 100_000):
        export = sharegpt_export(rows)
        runs[rows] = (*validate_once(params, export), export.stat().st_size / 1e6)
    (small_s, small_mb, _, small_size), (big_s, big_mb, big, big_size) = runs[10_000], runs[100_000]
    where = (
        f"`llmops validate` (fresh process, imports included) on a generated ShareGPT export ({big_size:.0f} MB, "
        f"{big_size * 1e3 / 100_000:.1f} KB a conversation), SmolLM2-135M-Instruct tokenizer and template, "
        f"max_seq_len 4096"
    )
    cleaned = (
        f"{big['rows_read']} read, {big['rows']} kept, dropped {big['dropped_rows']}, repaired "
        f"{sum(g['rows'] for g in big['repaired'])}, verdict {big['verdict']}"
    )
    return [
        {
            "name": "validate_100k_seconds",
            "ours": big_s,
            "baseline": BUDGET_SECONDS,
            "unit": "s",
            "detail": f"{where}: 100,000 conversations, {100_000 / big_s:.0f} conversations/s ({cleaned}); "
            "baseline: the 3-minute budget of issue 22",
        },
        {
            "name": "validate_linearity",
            "ours": big_s,
            "baseline": 10 * small_s,
            "unit": "s",
            "detail": f"{where}: 100,000 conversations vs 10 x the time of 10,000 ({small_s:.1f} s, "
            f"{small_size:.0f} MB): 1.0 is linear",
        },
        {
            "name": "validate_100k_peak_memory",
            "ours": big_mb,
            "baseline": BUDGET_MB,
            "unit": "MB",
            "detail": f"{where}: peak resident memory at 100,000 conversations (at 10,000: {small_mb:.0f} MB); "
            "baseline: the 2 GB budget of issue 22",
        },
    ]
