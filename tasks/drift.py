"""Has the incoming data moved away from what the champion was trained on?

Two kinds of incoming data: a batch of conversations (files), compared with the training conversations; and
served traffic, whose prompts (what users asked the champion) are compared with the training prompts.
Three views, each with its own threshold in `params.yaml` (`monitor:`), all under the champion's tokenizer:
- lengths: a two-sample Kolmogorov-Smirnov test on tokens per row (rendered as in training);
- vocabulary: the Jensen-Shannon divergence of token frequencies, and the share of incoming tokens that
  never occur in the reference (new words, new languages, new formats);
- the model itself: the champion's perplexity on incoming rows over its perplexity on reference rows (on
  the responses of a batch, on the prompts of traffic). This is the one that says whether the shift matters
  to the model.
Any view over its threshold is drift. Too few incoming rows give no verdict rather than a noisy one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from llmops.chat import render, render_prompt
from llmops.config import MonitorParams
from llmops.data import Conversation, Turn, file_md5, read_conversations, restore_files
from llmops.devices import DeviceChoice, DtypeChoice, resolve_placement
from llmops.errors import LLMOpsError
from llmops.files import atomic_dir
from llmops.modeling import EVAL_MAX_SEQ_LEN, load_model, load_tokenizer, prompt_perplexity, response_perplexity
from llmops.serving.traffic_log import feedback_mark, served_prompts

log = logging.getLogger(__name__)

PERPLEXITY_SAMPLE = 256  # rows per side scored by the champion: enough for a stable mean, cheap on a CPU


class DriftCheck(BaseModel, frozen=True):
    name: str
    value: float
    threshold: str
    drifted: bool


class DriftReport(BaseModel, frozen=True):
    view: Literal["conversations", "prompts"]  # a batch's conversations, or the prompts of served traffic
    source: str  # what was checked, in words
    incoming: list[Path]
    reference: Path
    incoming_rows: int
    reference_rows: int
    checks: list[DriftCheck]
    enough_rows: bool
    plot: Path | None

    @property
    def drifted(self) -> bool:
        return self.enough_rows and any(check.drifted for check in self.checks)

    @property
    def verdict(self) -> str:
        if not self.enough_rows:
            return "too few rows to judge"
        return "DRIFT" if self.drifted else "no drift"

    def scores(self) -> dict[str, float]:
        return {check.name: check.value for check in self.checks}

    def to_markdown(self) -> str:
        lines = [
            f"## Drift check: {self.verdict}",
            "",
            f"{self.incoming_rows} {self.source} against the {self.view} of {self.reference_rows} rows the "
            f"champion was trained on ({self.reference}).",
            "",
            "| check | value | threshold | result |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c.name} | {c.value:.4f} | {c.threshold} | {'DRIFT' if c.drifted else 'ok'} |" for c in self.checks
        ]
        return "\n".join(lines)


def detect_drift(
    params: MonitorParams,
    reference: Path,
    incoming: list[Path],
    champion_dir: Path,
    out: Path,
    device: DeviceChoice = "auto",
    dtype: DtypeChoice = "auto",
) -> DriftReport:
    """Compare the conversations of `incoming` (JSONL files) with `reference` (the champion's training split)
    and write a plot of both length distributions into `out`. The champion's perplexities run under the device
    policy."""
    rows = [conversation for path in incoming for conversation in read_conversations(path)]
    source = f"incoming rows ({', '.join(p.name for p in incoming)})"
    return _compare(params, reference, incoming, "conversations", source, rows, champion_dir, out, device, dtype)


def traffic_window(params: MonitorParams, now: datetime | None = None) -> datetime:
    """The start of the served-traffic window the check reads (`monitor.window_hours`)."""
    return (now or datetime.now(UTC)) - timedelta(hours=params.window_hours)


def detect_traffic_drift(
    params: MonitorParams,
    reference: Path,
    traffic: Path,
    version: str,
    champion_dir: Path,
    out: Path,
    device: DeviceChoice = "auto",
    dtype: DtypeChoice = "auto",
) -> DriftReport:
    """Compare the prompts that `version` (the champion) was served in the last `monitor.window_hours`, from the
    traffic log in `traffic`, with the prompts of `reference`; as `detect_drift` otherwise."""
    prompts = served_prompts(traffic, version, since=traffic_window(params))
    source = f"prompts served by version {version} ({traffic})"
    return _compare(params, reference, [traffic], "prompts", source, prompts, champion_dir, out, device, dtype)


def _compare(
    params: MonitorParams,
    reference: Path,
    incoming: list[Path],
    view: Literal["conversations", "prompts"],
    source: str,
    incoming_rows: Sequence[Conversation] | Sequence[Sequence[Turn]],
    champion_dir: Path,
    out: Path,
    device: DeviceChoice,
    dtype: DtypeChoice,
) -> DriftReport:
    tokenizer = load_tokenizer(champion_dir)
    reference_rows = read_conversations(reference)
    if len(reference_rows) > params.reference_rows:  # a fixed-size, seeded sample: the cost stays flat
        reference_rows = random.Random(0).sample(reference_rows, params.reference_rows)
    prompts_only = view == "prompts"
    if prompts_only:
        reference_rows = [c.prompt for c in reference_rows]
    perplexity = prompt_perplexity if prompts_only else response_perplexity

    def tokens(row) -> list[int]:
        return render_prompt(tokenizer, row) if prompts_only else render(tokenizer, row)[0]

    ref_tokens, new_tokens = [tokens(row) for row in reference_rows], [tokens(row) for row in incoming_rows]
    ref_lengths, new_lengths = [len(t) for t in ref_tokens], [len(t) for t in new_tokens]
    enough = len(incoming_rows) >= params.min_rows

    checks = []
    if enough:
        p_value = float(ks_2samp(ref_lengths, new_lengths).pvalue)
        ref_counts = Counter(token for row in ref_tokens for token in row)
        new_counts = Counter(token for row in new_tokens for token in row)
        vocabulary = sorted(ref_counts.keys() | new_counts.keys())
        divergence = float(
            jensenshannon([ref_counts[t] for t in vocabulary], [new_counts[t] for t in vocabulary], base=2) ** 2
        )
        unseen = sum(count for token, count in new_counts.items() if token not in ref_counts) / new_counts.total()
        placement = resolve_placement(device, dtype)
        model = load_model(champion_dir, dtype=placement.dtype, device=placement.device)

        def mean_perplexity(rows) -> float:
            sample = random.Random(0).sample(list(rows), min(len(rows), PERPLEXITY_SAMPLE))
            return perplexity(model, tokenizer, sample, EVAL_MAX_SEQ_LEN)

        ppl_ratio = mean_perplexity(incoming_rows) / mean_perplexity(reference_rows)
        checks = [
            DriftCheck(
                name="length_ks_p_value",
                value=p_value,
                threshold=f"< {params.length_p_value}",
                drifted=p_value < params.length_p_value,
            ),
            DriftCheck(
                name="token_js_divergence",
                value=divergence,
                threshold=f"> {params.max_token_divergence}",
                drifted=divergence > params.max_token_divergence,
            ),
            DriftCheck(
                name="unseen_token_rate",
                value=unseen,
                threshold=f"> {params.max_unseen_token_rate}",
                drifted=unseen > params.max_unseen_token_rate,
            ),
            DriftCheck(
                name="perplexity_ratio",
                value=ppl_ratio,
                threshold=f"> {params.max_perplexity_ratio}",
                drifted=ppl_ratio > params.max_perplexity_ratio,
            ),
        ]
    with atomic_dir(out) as tmp:
        plot = _plot_lengths(ref_lengths, new_lengths, tmp / "lengths.png")
    return DriftReport(
        view=view,
        source=source,
        incoming=incoming,
        reference=reference,
        incoming_rows=len(incoming_rows),
        reference_rows=len(reference_rows),
        checks=checks,
        enough_rows=enough,
        plot=out / plot.name,
    )


def champion_reference(dataset: dict[str, str], dvc_record: str | None) -> Path:
    """The training split the champion was trained on, from its lineage (`tracking.describe_version`):
    restored through DVC at the recorded version, or the recorded path when the data was not versioned."""
    train = Path(dataset["train"])
    if dvc_record and dataset.get("dvc_file"):
        [restored] = restore_files(dvc_record, Path(dataset["dvc_file"]), [train])
        return restored
    if not train.exists():  # a file, or a folder of them
        raise LLMOpsError(
            f"The champion's training data {train} is gone and was not versioned with DVC, so there is nothing "
            "to compare incoming data against. Retrain on DVC-tracked data (`llmops ingest`, `llmops run`)."
        )
    log.warning("The champion's training data was not versioned with DVC; comparing against %s as it is now", train)
    return train


def _plot_lengths(reference: list[int], incoming: list[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(reference + incoming, bins=30)
    for name, lengths in (("reference", reference), ("incoming", incoming)):
        if lengths:  # no rows, no distribution to draw
            ax.hist(lengths, bins=bins, density=True, alpha=0.6, label=f"{name} ({len(lengths)} rows)")
    ax.set_xlabel("tokens per row (champion's tokenizer)")
    ax.set_ylabel("share of rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- No retrain storm: the monitor fires once for the same champion and the same incoming data. -----------


def drift_fingerprint(champion_version: str, batch: Sequence[Path], traffic: Path | None) -> dict[str, str]:
    """What a drift event is fired for: the champion, the batch's files (names and contents) and the traffic
    log's judged high-water mark (`llmops.serving.traffic_log.feedback_mark`). A retrain that answers the event either
    moves the champion (promoted) or not (rejected); only a new champion, a new batch or new judgments are
    worth another retrain: the same ones would make the same candidate."""
    listing = "".join(f"{f.name} {file_md5(f)}\n" for f in sorted(batch))
    return {
        "champion_version": champion_version,
        "batch": hashlib.md5(listing.encode()).hexdigest() if batch else "",
        "traffic": feedback_mark(traffic) if traffic is not None else "",
    }


def already_fired(record: Path, fingerprint: dict[str, str]) -> bool:
    """Whether the last drift event (`record`, written by `remember_fired`) was fired for this champion and
    judged traffic, with no new batch since: none now (the retrain archived it), or the same one."""
    try:
        last = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    same = all(last.get(key) == fingerprint[key] for key in ("champion_version", "traffic"))
    return same and fingerprint["batch"] in ("", last.get("batch"))


def remember_fired(record: Path, fingerprint: dict[str, str]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(f".{record.name}.tmp")
    partial.write_text(json.dumps(fingerprint, sort_keys=True))
    partial.replace(record)  # atomic: a crash leaves the previous record, never half of one
