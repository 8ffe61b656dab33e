"""Fold new rows into the training set, only if they pass validation, and version the result with DVC.

Order matters for safety: the new file and the combined candidate are validated before anything is
touched; the candidate is written beside the dataset and swapped in with an atomic rename; only then is
it `dvc add`-ed and pushed. Bad data never replaces the dataset, and a crash at any point leaves the
previous version intact (on disk, or in the DVC cache it was pushed to). All of it runs under the DVC lock,
so two ingests at once never lose each other's rows: each reads the set the other left.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from llmops.chat import load_chat_template
from llmops.config import LoopParams, ValidateParams
from llmops.data import (
    TRAFFIC_EVAL_FILE,
    JsonlReader,
    batch_files,
    dvc_lock,
    dvc_root,
    parse_jsonl,
    split_files,
    track,
    tracked_version,
    traffic_eval_split,
    write_jsonl,
)
from llmops.errors import LLMOpsError
from llmops.modeling import load_tokenizer
from llmops.serving.traffic_log import considered_ids, held_out, judged_traffic, record_considered, traffic_log
from tasks.validate import FEATURES, DataReport, ExcessLength, InvalidData, SplitReport, check_split, clean

log = logging.getLogger(__name__)


class FoldedTraffic(BaseModel, frozen=True):
    """What an ingest took from a served-traffic log (`llmops.serving.traffic_log`), and why it left the rest."""

    log: Path
    folded: int  # judged exchanges added: a reviewer's correction, or the server's answer rated up
    held_out: int = 0  # fit, but held out as the traffic eval split (loop.eval_share): evaluated, never trained
    set_aside: int = 0  # a liked answer on a held-out prompt: the model's own words judge no model; never trains
    waiting: int = 0  # fit, but over loop.max_traffic_share: the newest, left for the next retrain
    left_out: int  # never judged, judged down with no correction, or judged by someone whose judgment does not train
    already_there: int = 0  # judged, but the training set (or an earlier exchange) already holds the conversation
    dropped: dict[str, int] = {}  # judged, but cleaning or the data checks refused the row, by reason
    considered_before: int = 0  # judged exchanges an earlier ingest considered (the ledger): not looked at again

    def summary(self) -> str:
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items())) or "none"
        return (
            f"{self.folded} judged exchanges folded in, {self.held_out} held out for evaluation, {self.set_aside} "
            f"set aside, {self.waiting} waiting (loop.max_traffic_share); "
            f"{self.already_there} already in the training set; dropped: {dropped}; left out {self.left_out} "
            f"never judged, judged down or not trusted to train; {self.considered_before} considered before"
        )

    def metrics(self) -> dict[str, float]:
        counts = {
            "folded": self.folded,
            "held_out": self.held_out,
            "set_aside": self.set_aside,
            "waiting": self.waiting,
            "left_out": self.left_out,
            "already_there": self.already_there,
            "dropped": sum(self.dropped.values()),
            "considered_before": self.considered_before,
        }
        return {f"traffic.{k}": v for k, v in counts.items()} | {
            f"traffic.dropped.{r}": n for r, n in self.dropped.items()
        }


class IngestResult(BaseModel, frozen=True):
    dataset: Path
    mode: str
    rows_before: int
    rows_after: int
    previous_version: str | None
    version: str | None  # unchanged (the previous version) when nothing was fit to fold in
    already_there: int = 0  # batch rows the training set already held: skipped, not a defect
    traffic: FoldedTraffic | None = None

    def metrics(self) -> dict[str, float]:
        """The numbers the run logs (`ingest.*`)."""
        counts = {"rows_before": self.rows_before, "rows_after": self.rows_after, "already_there": self.already_there}
        return {f"ingest.{k}": v for k, v in ((self.traffic.metrics() if self.traffic else {}) | counts).items()}

    def to_markdown(self) -> str:
        lines = [
            f"## Ingest into `{self.dataset}`: {self.rows_before} -> {self.rows_after} training rows",
            "",
            f"- version {self.previous_version} -> {self.version}"
            + (" (unchanged: nothing new to fold in)" if self.version == self.previous_version else ""),
            f"- batch rows already in the training set (skipped): {self.already_there}",
        ]
        if self.traffic:
            t = self.traffic
            lines += [
                "",
                f"### Judged traffic from `{t.log}`",
                "",
                "| judged exchanges | rows |",
                "|---|---|",
                f"| folded in | {t.folded} |",
                f"| held out as the traffic eval split (loop.eval_share; never trains) | {t.held_out} |",
                f"| set aside: a liked answer on a held-out prompt (never trains nor judges) | {t.set_aside} |",
                f"| waiting for the next retrain (loop.max_traffic_share) | {t.waiting} |",
                f"| already in the training set | {t.already_there} |",
                *[f"| dropped: {TRAFFIC_DROPS.get(r, r)} | {n} |" for r, n in sorted(t.dropped.items())],
                f"| considered by an earlier ingest | {t.considered_before} |",
                f"| left out: never judged, judged down, or not trusted to train | {t.left_out} |",
            ]
        return "\n".join(lines) + "\n"


# Why a judged exchange is dropped, beyond what cleaning drops (`tasks.validate.drop_descriptions`): what the
# suite would refuse in a whole split is refused here row by row, so one bad row never fails a retrain.
TRAFFIC_DROPS = {
    "unreadable": "the log row is malformed (no context or answer to read)",
    "blank_prompt": "blank user message",
    "prompt_too_long": "prompt longer than validate.max_prompt_tokens",
    "response_too_long": "response longer than validate.max_response_tokens",
    "echoes_prompt": "response repeats the prompt",
    "credential": "holds what looks like a credential",
    "special_token": "holds a literal special token (e.g. </s>)",
    "damaged_text": "control characters or U+FFFD (damaged text)",
    "eval_prompt": "its prompt is also an eval prompt (leakage)",
    "in_eval": "exact copy of an eval conversation (leakage)",
}


def ingest_dataset(
    params: ValidateParams,
    base_model: str,
    max_seq_len: int,
    new: Path,
    train: Path,
    eval: Path,
    mode: Literal["append", "replace"],
    archive: bool = False,
    excess_length: ExcessLength = "drop",
    chat_template: Path | None = None,
    out: Path | None = None,
    loop: LoopParams | None = None,
) -> IngestResult:
    """Validate `new` (a JSONL file, or a folder of them taken as one batch), append it to (or replace)
    `train`, and `dvc add` + push the dataset folder. With `archive`, the ingested files are then moved to
    `ingested/<time>/` beside them, so a watched folder's batch is folded in once.

    A folder may hold a served-traffic log (`llmops serve` writes one under `monitor.incoming/traffic`): its
    judged exchanges join too (`llmops.serving.traffic_log.judged_traffic`, under the `loop` config: only a
    reviewer's correction or the server's own answer is ever a target). Traffic is cleaned, then judged, row by
    row: a bad row is dropped and counted by reason, never failing the ingest; what the training set already
    holds is "already there"; `loop.eval_share` of the prompts (by hash) are held out, never trained: their
    corrections are appended to the traffic eval split beside `train` and versioned with it, their liked answers
    set aside; at most `loop.max_traffic_share` of the training set is traffic, the newest beyond it waiting.
    Each judged exchange is considered once: the ledger beside the log (`llmops.serving.traffic_log.LEDGER`)
    records what became of it, after the dataset is versioned. The log itself is never moved.

    The batch is cleaned and judged like a split. Its rows the training set already holds are skipped, not
    defects: a batch delivered twice folds nothing in the second time, and fails nothing. It is added as it
    was given (cleaning happens again when the training set is validated); rows in another row shape than
    `train` are stored with it in the `messages` shape, since one file holds one format. When `train` is a
    folder split, its files stay as they are: the new rows land as a file of their own in it,
    `ingested-<UTC time>-<batch name>.jsonl`. With `out` (the validate stage's), the training set the rows
    make is checked as the validate stage checks it, and that stage reuses the check.

    Raises:
        InvalidData: the new batch, or the training set the rows would make, fails validation (nothing changed).
        LLMOpsError: the dataset is not inside a DVC repository, or a DVC command failed (dataset restored).
    """
    loop = loop or LoopParams()
    root = dvc_root(train)
    if root is None:
        raise LLMOpsError(
            f"{train} is not inside a DVC repository, so an ingest could not be versioned. "
            "Run `dvc init` in the project (it is already one on a fresh clone of this repo)."
        )
    with dvc_lock(root):  # the same lock as `dvc add`: read, swap and version as one step
        files = batch_files(new)
        served = traffic_log(new) if new.is_dir() else None
        if not files and served is None:
            raise LLMOpsError(f"{new} holds no *.jsonl files: there is nothing to ingest.")
        options = {"excess_length": excess_length, "chat_template": load_chat_template(chat_template)}
        current = parse_jsonl(train, params.max_line_bytes) if train.exists() else None
        existing = current if mode == "append" else None  # the rows the new ones join
        known = {c.key() for _, c in existing.rows} if existing else set()
        held_split = traffic_eval_split(train)
        if held_split.is_file():  # held-out traffic never trains, nor is it held out twice
            known |= {c.key() for _, c in parse_jsonl(held_split, params.max_line_bytes).rows}
        before = len(current.rows) if current else 0
        previous = tracked_version(train)

        def check(part: Path, shown_as: Path) -> SplitReport:
            joins = train if mode == "append" else None  # rows already in `train` count as duplicates
            report = check_split(params, base_model, max_seq_len, part, other=eval, joins=joins, **options)
            if not report.ok:
                raise InvalidData(DataReport(splits=[report.model_copy(update={"path": shown_as})]))
            return report

        scratch = Path(tempfile.mkdtemp(prefix=".ingest-", dir=train.parent.parent))  # outside the tracked folder
        try:
            parts: list[Path] = []  # checked files whose rows join the training set
            already_there = batch_rows = 0
            if files:  # one batch, validated as one file (row numbers count through the files in name order)
                batch = files[0] if len(files) == 1 else _concatenate(files, scratch / "batch.jsonl")
                batch, already_there = _without_rows_already_there(batch, known, scratch, params.max_line_bytes)
                if batch is not None:
                    batch_rows = check(batch, new).rows
                    parts.append(_compacted(batch, scratch / "batch-new.jsonl"))
            traffic, outcomes, evaluation = None, {}, None
            if served is not None:
                traffic, taken, held, outcomes = _judge_traffic(
                    served, loop, params, base_model, max_seq_len, eval, known, before + batch_rows, options
                )
                log.info("traffic log %s: %s", served, traffic.summary())
                if taken:
                    (scratch / "traffic.jsonl").write_text("".join(taken), encoding="utf-8")
                    parts.append(scratch / "traffic.jsonl")
                if held:  # the traffic eval split as it will be: the rows it held, then the new ones
                    held_before = [held_split] if held_split.is_file() else []
                    evaluation = _concatenate(held_before, scratch / TRAFFIC_EVAL_FILE)
                    with evaluation.open("a", encoding="utf-8") as handle:
                        handle.write("".join(held))
            # The held-out rows are versioned with the training set, and put back if versioning fails.
            with _swapped_in(evaluation, held_split, scratch):
                if not parts and evaluation is None:  # nothing new to fold in: the dataset stays as it is
                    combined, version = None, previous[1] if previous else None
                elif not parts:  # only rows for the traffic eval split: the training set stays as it is
                    combined, version = None, track(train.parent)
                elif train.is_dir():
                    combined, version = _add_to_folder(train, new, parts, params, scratch, mode, base_model,
                                                       max_seq_len, eval, options, out)  # fmt: skip
                else:
                    candidate = scratch / "candidate.jsonl"
                    sources = ([train] if existing else []) + parts  # the rows kept, then the new ones
                    parsed = [existing] if existing else []
                    parsed += [parse_jsonl(part, params.max_line_bytes) for part in parts]
                    if len({p.format for p in parsed}) == 1:  # one shape: the files' own bytes
                        _concatenate(sources, candidate)
                    else:
                        write_jsonl(candidate, [c for p in parsed for _, c in p.rows])
                    combined = check_split(params, base_model, max_seq_len, candidate, other=eval, **options)
                    if not combined.ok:  # e.g. the new rows together fail a check
                        raise InvalidData(DataReport(splits=[combined.model_copy(update={"path": train})]))
                    with _swapped_in(candidate, train, scratch):
                        version = track(train.parent)
            if served is not None:  # versioned (or nothing to version): these were considered, once
                record_considered(served, outcomes)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if archive and files:
            done = files[0].parent / "ingested" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
            done.mkdir(parents=True)
            for f in files:
                f.rename(done / f.name)
        return IngestResult(
            dataset=train.parent,
            mode=mode,
            rows_before=before,
            rows_after=combined.rows_read if combined else before,
            previous_version=previous[1] if previous else None,
            version=version,
            already_there=already_there,
            traffic=traffic,
        )


@contextmanager
def _swapped_in(staged: Path | None, target: Path, scratch: Path) -> Iterator[None]:
    """Put `staged` in place of `target` with an atomic rename (readers see the old file or the new one, never
    half of one); if the block raises (e.g. versioning failed), put the old file back. A hard link keeps the
    old file reachable without a moment where `target` is missing; it lives in `scratch`, outside the tracked
    folder, so `dvc add` never versions it."""
    if staged is None:
        yield
        return
    backup = scratch / f"before-{target.name}"
    if target.exists():
        os.link(target, backup)
    os.replace(staged, target)
    try:
        yield
    except BaseException:
        if backup.exists():
            os.replace(backup, target)
        else:
            target.unlink(missing_ok=True)
        raise


def _without_rows_already_there(
    batch: Path, known: set[str], scratch: Path, max_line_bytes: int
) -> tuple[Path | None, int]:
    """The batch without the rows the training set already holds (their lines blanked, so the check's line
    numbers are still the batch's), and how many there were; None when nothing else is left in it."""
    reader = JsonlReader(batch, max_line_bytes)
    there = {where for where, conversation in reader if conversation.key() in known}
    if not there:
        return batch, 0
    lines = batch.read_bytes().split(b"\n")
    kept = [b"" if number in there else line for number, line in enumerate(lines, 1)]
    if not any(line.strip() for line in kept):
        return None, len(there)
    rest = scratch / "batch-unseen.jsonl"
    rest.write_bytes(b"\n".join(kept))
    return rest, len(there)


def _compacted(batch: Path, out: Path) -> Path:
    """The batch without blank lines (those `_without_rows_already_there` left), as it lands in the dataset."""
    content = batch.read_bytes()
    if b"\n\n" not in content and not content.startswith(b"\n"):
        return batch
    out.write_bytes(b"".join(line + b"\n" for line in content.split(b"\n") if line.strip()))
    return out


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.append(text)


def _judge_traffic(
    served: Path,
    loop: LoopParams,
    params: ValidateParams,
    base_model: str,
    max_seq_len: int,
    eval: Path,
    known: set[str],
    rows_before: int,
    options: dict,
) -> tuple[FoldedTraffic, list[str], list[str], dict[str, str]]:
    """Clean, then judge, the judged exchanges of a traffic log, row by row: (what happened, the kept rows to
    train on as `messages` JSON lines within the cap, the rows held out for the traffic eval split, the ledger
    outcome of each exchange considered). `rows_before`: the training set's rows with the new batch's, traffic
    folded earlier (the ledger's) included."""
    ledger = considered_ids(served)
    judged = judged_traffic(served, loop, considered=ledger.keys())
    outcomes = {i: "dropped:unreadable" for i in judged.unreadable}
    dropped = Counter({"unreadable": len(judged.unreadable)} if judged.unreadable else {})
    already = 0
    kept: list[tuple[str, str]] = []  # (id, cleaned row) to train on
    held: list[str] = []  # cleaned rows for the traffic eval split
    set_aside = 0
    if judged.rows:
        tokenizer = load_tokenizer(base_model, options["chat_template"])
        eval_keys = [c.keys() for _, c in parse_jsonl(eval, params.max_line_bytes).rows]
        sink = _Lines()
        cleaning = clean(
            ((index, row.conversation) for index, row in enumerate(judged.rows)),
            tokenizer,
            params,
            max_seq_len,
            options["excess_length"],
            eval_keys=frozenset(key for key, _ in eval_keys),
            seen_keys=frozenset(known),
            other_prompts=frozenset(prompt for _, prompt in eval_keys),
            sink=sink,
        )
        for reason, rows in cleaning.dropped.items():
            for _, index in rows:
                # A duplicate of the training set (or of an earlier exchange) is already there, not a defect.
                outcome = "already_there" if reason == "duplicate" else f"dropped:{reason}"
                outcomes[judged.rows[index].id] = outcome
                if reason == "duplicate":
                    already += 1
                else:
                    dropped[reason] += 1
        for line, features in zip(sink.lines, cleaning.features, strict=True):
            found = dict(zip(FEATURES, features, strict=True))
            row = judged.rows[int(found["row"])]
            reason = _refused(found, params)
            if reason:
                outcomes[row.id] = f"dropped:{reason}"
                dropped[reason] += 1
            elif not held_out(row.conversation, loop.eval_share):
                kept.append((row.id, line))
            elif row.source == "correction":
                outcomes[row.id] = "held_out"
                held.append(line)
            else:  # the split judges candidate against champion: the server's own answer would flatter its author
                outcomes[row.id] = "set_aside"
                set_aside += 1
    folded_before = sum(outcome == "folded" for outcome in ledger.values())
    room = _room(loop.max_traffic_share, max(0, rows_before - folded_before), folded_before)
    taken, waiting = kept[:room], kept[room:]  # the log's order: the newest wait, unrecorded, for the next retrain
    outcomes.update({i: "folded" for i, _ in taken})
    traffic = FoldedTraffic(
        log=served,
        folded=len(taken),
        held_out=len(held),
        set_aside=set_aside,
        waiting=len(waiting),
        left_out=judged.left_out,
        already_there=already + judged.duplicates,
        dropped=dict(dropped),
        considered_before=judged.considered_before,
    )
    return traffic, [line for _, line in taken], held, outcomes


def _refused(found: dict, params: ValidateParams) -> str | None:
    """What the suite would refuse in this kept row (`tasks.validate.build_suite`), as a drop reason."""
    if found["question_blank"]:
        return "blank_prompt"
    if found["prompt_credential"] or found["response_credential"]:
        return "credential"
    if found["prompt_special_token"] or found["response_special_token"]:
        return "special_token"
    if found["prompt_damaged"] or found["response_damaged"]:
        return "damaged_text"
    if found["in_other_split"]:
        return "eval_prompt"
    if found["prompt_tokens"] > params.max_prompt_tokens:
        return "prompt_too_long"
    if found["response_tokens"] > params.max_response_tokens:
        return "response_too_long"
    if found["echoes_prompt"]:
        return "echoes_prompt"
    return None


def _room(share: float, other_rows: int, traffic_rows: int) -> int:
    """How many more traffic rows fit so that traffic stays within `share` of the training set:
    traffic + t <= share * (other + traffic + t)."""
    if share >= 1:
        return sys.maxsize
    return max(0, math.floor((share * other_rows - traffic_rows * (1 - share)) / (1 - share) + 1e-9))


def _add_to_folder(train, new, parts, params, scratch, mode, base_model, max_seq_len, eval, options, out):
    """The new rows as a file of their own in the folder split `train` (its other files replaced in `replace`
    mode), checked first as the split they make, then versioned. Returns (that check, the new version)."""
    parsed = [parse_jsonl(part, params.max_line_bytes) for part in parts]
    staged = scratch / train.name  # the split as it will be: the same names, so the validate stage reuses the check
    staged.mkdir()
    kept = split_files(train) if mode == "append" else []
    for f in kept:
        os.link(f, staged / f.name)
    target = staged / f"ingested-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{new.stem}.jsonl"
    if len({p.format for p in parsed}) == 1:  # one shape: the batch's own bytes
        _concatenate(parts, target)
    else:
        write_jsonl(target, [c for p in parsed for _, c in p.rows])
    combined = check_split(params, base_model, max_seq_len, staged, other=eval, out=out, **options)
    if not combined.ok:  # e.g. the new rows duplicate existing ones
        raise InvalidData(DataReport(splits=[combined.model_copy(update={"path": train})]))
    replaced = [] if mode == "append" else split_files(train)
    backup = scratch / "before"
    backup.mkdir()
    for f in replaced:  # kept reachable outside the tracked folder until the new version is pushed
        os.replace(f, backup / f.name)
    os.replace(target, train / target.name)
    try:
        return combined, track(train.parent)
    except BaseException:
        (train / target.name).unlink(missing_ok=True)
        for f in replaced:
            os.replace(backup / f.name, f)
        raise


def _concatenate(files: list[Path], out: Path) -> Path:
    out.write_bytes(b"".join(_with_newline(f.read_bytes()) for f in files))
    return out


def _with_newline(content: bytes) -> bytes:
    return content if content.endswith(b"\n") or not content else content + b"\n"
