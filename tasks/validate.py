"""Stop bad data at the door: structural parsing, cleaning as the trainers do it, then one Great Expectations
suite over each cleaned split.

Fine-tuning fails quietly on bad data: a conversation truncated mid-answer teaches the model never to stop,
an eval conversation copied into training inflates every metric, a pasted secret or a customer's e-mail gets
memorised. What trainers (Axolotl, TRL, torchtune) silently drop is dropped here too, but counted and
reported by reason: exact duplicates (also of eval rows), assistant turns too short to teach anything, and
conversations longer than `finetune.max_seq_len` (or shortened: `data.excess_length`). Personal data is
redacted (`validate.pii`). The split fails when too much had to go (`validate.max_dropped_ratio`), and for
what is a real defect: unreadable lines, credentials, literal special tokens, damaged text, eval leakage.
Token counts use the base model's tokenizer and the one rendering of `llmops.chat`.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel

from llmops import privacy
from llmops.chat import load_chat_template, render, render_prompt
from llmops.config import ValidateParams, dvc_stage_args
from llmops.data import Conversation, DatasetRef, Turn, file_md5, parse_jsonl, tracked_version, write_jsonl
from llmops.errors import LLMOpsError
from llmops.files import atomic_dir, save_result, write_json
from llmops.modeling import load_tokenizer

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # GX would otherwise try to phone home, offline here
import great_expectations as gx  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

EXAMPLES_SHOWN = 5
SECRET_PATTERNS = privacy.SECRET_PATTERNS
# Text damage: control characters other than tab/newline, and U+FFFD left by a lossy decode upstream.
DAMAGE_PATTERNS = [r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "\ufffd"]
ExcessLength = Literal["drop", "truncate_prompt", "raise"]


class ExpectationFailure(BaseModel, frozen=True):
    problem: str
    expectation: str
    unexpected_rows: int
    example_lines: list[int]

    def __str__(self) -> str:
        lines = ", ".join(map(str, self.example_lines))
        return f"{self.problem}: {self.unexpected_rows} row(s)" + (f", e.g. line(s) {lines}" if lines else "")


class DropGroup(BaseModel, frozen=True):
    """Rows cleaning removed for one reason."""

    reason: str  # duplicate | in_eval | short_response | excess_length
    description: str
    rows: int
    example_lines: list[int]

    def __str__(self) -> str:
        return f"{self.description}: {self.rows} row(s), e.g. line(s) {', '.join(map(str, self.example_lines))}"


class SplitReport(BaseModel, frozen=True):
    path: Path
    format: str | None  # the detected row shape
    rows_read: int
    rows: int  # kept after cleaning: what trains (or evaluates)
    md5: str  # of the file as given
    dropped: list[DropGroup] = []
    truncated: int = 0  # rows shortened to fit (data.excess_length: truncate_prompt)
    pii: dict[str, int] = {}  # personal data found, by kind (redacted unless validate.pii says otherwise)
    changed: bool = False  # cleaning changed something: the cleaned file, not the raw one, must train
    cleaned: Path | None = None  # the cleaned rows (messages shape), when an output folder was given
    cleaned_md5: str | None = None
    structural: list[str]
    failures: list[ExpectationFailure]

    @property
    def ok(self) -> bool:
        return not self.structural and not self.failures

    @property
    def dropped_rows(self) -> int:
        return sum(group.rows for group in self.dropped)

    @property
    def verdict(self) -> str:
        return "valid" if self.ok else "invalid"

    def counts(self) -> dict[str, int]:
        """Rows read, kept, dropped (by reason), shortened and redacted: the numbers the run logs."""
        return {
            "rows_read": self.rows_read,
            "rows": self.rows,
            "dropped": self.dropped_rows,
            **{f"dropped.{group.reason}": group.rows for group in self.dropped},
            "truncated": self.truncated,
            **{f"pii.{kind}": n for kind, n in self.pii.items()},
        }

    def problems(self) -> list[str]:
        shown = self.structural[:EXAMPLES_SHOWN]
        more = len(self.structural) - len(shown)
        return shown + ([f"... and {more} more malformed line(s)"] if more else []) + [str(f) for f in self.failures]

    def cleaning_lines(self) -> list[str]:
        """What cleaning did, one line each (empty when it changed nothing)."""
        lines = [f"dropped {group}" for group in self.dropped]
        if self.truncated:
            lines.append(
                f"shortened to fit finetune.max_seq_len (data.excess_length: truncate_prompt): {self.truncated}"
            )
        if self.pii:
            lines.append("personal data found: " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.pii.items())))
        return lines


class InvalidData(LLMOpsError):
    """The dataset failed validation; `report` says what, where and how much."""

    def __init__(self, report: DataReport):
        self.report = report
        super().__init__(
            "Dataset failed validation, nothing was trained. "
            + " | ".join(f"{s.path}: {'; '.join(s.problems())}" for s in report.splits if not s.ok)
            + ". Fix or remove those rows, or adjust the thresholds under validate: in params.yaml."
        )


class DataReport(BaseModel, frozen=True):
    splits: list[SplitReport]
    chat_template: str | None = None  # data.chat_template's text, carried into the dataset reference

    @property
    def ok(self) -> bool:
        return all(split.ok for split in self.splits)

    def require_valid(self) -> DatasetRef:
        """The dataset reference for training (the cleaned splits), or InvalidData if any split failed."""
        if not self.ok:
            raise InvalidData(self)
        train, eval_ = self.splits
        dvc_file, dvc_version = tracked_version(train.path) or (None, None)
        return DatasetRef(
            train=_trained_file(train),
            eval=_trained_file(eval_),
            train_rows=train.rows,
            eval_rows=eval_.rows,
            train_md5=train.cleaned_md5 or train.md5,
            eval_md5=eval_.cleaned_md5 or eval_.md5,
            raw_train=train.path,
            raw_eval=eval_.path,
            raw_train_md5=train.md5,
            raw_eval_md5=eval_.md5,
            dropped=dict(sum((Counter({g.reason: g.rows for g in s.dropped}) for s in self.splits), Counter())),
            chat_template=self.chat_template,
            dvc_file=dvc_file,
            dvc_version=dvc_version,
        )

    def to_markdown(self) -> str:
        lines = [f"## Data validation {'passed' if self.ok else 'FAILED'}", ""]
        for split in self.splits:
            lines += [
                f"### `{split.path}`: {split.rows_read} rows read ({split.format or 'no format'}), {split.rows} kept, "
                f"{'ok' if split.ok else 'rejected'}",
                "",
            ]
            if split.dropped:
                lines += ["| dropped because | rows | e.g. lines |", "|---|---|---|"]
                lines += [
                    f"| {g.description} | {g.rows} | {', '.join(map(str, g.example_lines))} |" for g in split.dropped
                ]
                lines.append("")
            lines += [f"- {line}" for line in split.cleaning_lines() if not line.startswith("dropped ")]
            lines += [f"- {problem}" for problem in split.problems()] or ["- every expectation met"]
            lines.append("")
        return "\n".join(lines)


def _trained_file(split: SplitReport) -> Path:
    if split.cleaned:
        return split.cleaned
    if split.changed:
        raise LLMOpsError(f"Cleaning changed {split.path}, but no output folder was given to write the cleaned split.")
    return split.path


# --- Cleaning: what trainers drop silently, dropped here and counted. ---------------------------------------


@dataclass
class Cleaning:
    kept: list[tuple[int, Conversation]] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> lines
    too_long: list[int] = field(default_factory=list)  # lines over max_seq_len, with data.excess_length: raise
    truncated: int = 0
    pii: Counter = field(default_factory=Counter)
    pii_lines: list[int] = field(default_factory=list)
    redacted: int = 0


def drop_descriptions(params: ValidateParams, max_seq_len: int) -> dict[str, str]:
    return {
        "duplicate": "duplicate rows (exact copy of an earlier conversation)",
        "in_eval": "exact copy of an eval-split conversation (leakage)",
        "short_response": f"response shorter than {params.min_response_chars} characters (an assistant turn)",
        "excess_length": f"longer than finetune.max_seq_len={max_seq_len} tokens (data.excess_length)",
    }


def clean(
    rows: list[tuple[int, Conversation]],
    tokenizer,
    params: ValidateParams,
    max_seq_len: int,
    excess_length: ExcessLength = "drop",
    eval_keys: frozenset[str] = frozenset(),
    seen_keys: frozenset[str] = frozenset(),
) -> Cleaning:
    """Redact personal data, then drop short answers, duplicates (also of `seen_keys`, e.g. the training set
    an incoming batch joins) and copies of eval rows (`eval_keys`), and fit every row to `max_seq_len`.

    A row with a defect the suite refuses (a credential, a literal special token, damaged text) is never
    dropped: it stays for the suite to fail the file, so a defect cannot hide in a row that is also too long."""
    result = Cleaning()
    seen = set(seen_keys)
    defect = re.compile(
        "|".join([*SECRET_PATTERNS.values(), *DAMAGE_PATTERNS, *map(re.escape, tokenizer.all_special_tokens)])
    )
    for line, conversation in rows:
        if any(defect.search(t.content) for t in conversation.turns):
            result.kept.append((line, conversation))
            continue
        found = sum((privacy.count(t.content, privacy.PII_KINDS) for t in conversation.turns), Counter())
        if found:
            result.pii += found
            result.pii_lines.append(line)
            if params.pii == "redact":
                redacted = tuple(Turn(t.role, privacy.redact(t.content, privacy.PII_KINDS)) for t in conversation.turns)
                conversation = Conversation(redacted)
                result.redacted += 1
        reason = None
        key = conversation.key()
        if any(len(t.content.strip()) < params.min_response_chars for t in conversation.turns if t.role == "assistant"):
            reason = "short_response"
        elif key in eval_keys:
            reason = "in_eval"
        elif key in seen:
            reason = "duplicate"
        seen.add(key)
        if reason is None and len(render(tokenizer, conversation)[0]) > max_seq_len:
            if excess_length == "raise":
                result.too_long.append(line)
                continue
            shorter = (
                truncate_prompt(tokenizer, conversation, max_seq_len) if excess_length == "truncate_prompt" else None
            )
            if shorter is None:
                reason = "excess_length"
            else:
                conversation = shorter
                result.truncated += 1
        if reason:
            result.dropped.setdefault(reason, []).append(line)
        else:
            result.kept.append((line, conversation))
    return result


def truncate_prompt(tokenizer, conversation: Conversation, max_seq_len: int) -> Conversation | None:
    """The conversation cut to `max_seq_len` tokens from the front: the system turn and the whole last answer
    stay; whole earlier exchanges go first, then the start of the last question. None if even that cannot fit."""
    turns = conversation.turns  # it ends on its last answer
    system, body = (turns[:1], turns[1:]) if turns[0].role == "system" else ((), turns)

    def fits(candidate: tuple[Turn, ...]) -> bool:
        return len(render(tokenizer, Conversation(system + candidate))[0]) <= max_seq_len

    while not fits(body):
        later_users = [i for i, t in enumerate(body) if t.role == "user" and i > 0]
        if not later_users:
            break
        body = body[later_users[0] :]
    else:
        return Conversation(system + body)
    question, rest = body[0], body[1:]
    ids = tokenizer(question.content, add_special_tokens=False)["input_ids"]
    room = max_seq_len - len(render(tokenizer, Conversation(system + (Turn("user", ""),) + rest))[0])
    while room > 0:
        candidate = (Turn("user", tokenizer.decode(ids[-room:]).strip()),) + rest
        if fits(candidate):
            return Conversation(system + candidate)
        room -= 1
    return None


def row_features(rows: list[tuple[int, Conversation]], tokenizer, other_prompts: set[str]) -> pd.DataFrame:
    """One row per conversation with the columns the suite judges, computed with the model's tokenizer."""
    prompt_tokens = [len(render_prompt(tokenizer, c.prompt)) for _, c in rows]
    total_tokens = [len(render(tokenizer, c)[0]) for _, c in rows]
    frame = pd.DataFrame(
        {
            "line": [n for n, _ in rows],
            "question": [c.last_user for _, c in rows],
            "prompt": ["\n".join(t.content for t in c.prompt) for _, c in rows],
            "response": [c.reference for _, c in rows],
            "prompt_tokens": prompt_tokens,
            "response_tokens": [t - p for t, p in zip(total_tokens, prompt_tokens, strict=True)],
            "in_other_split": [c.key(c.prompt) in other_prompts for _, c in rows],
        }
    )
    frame["echoes_prompt"] = frame.question.str.strip() == frame.response.str.strip()
    return frame


def build_suite(params: ValidateParams, tokenizer, check_leakage: bool) -> list[gx.expectations.Expectation]:
    """The instruction-data suite's expectations over a cleaned split; each says in `meta.problem` what a
    failure means."""
    E = gx.expectations
    special = [re.escape(token) for token in tokenizer.all_special_tokens]
    expectations = [
        (E.ExpectTableRowCountToBeBetween(min_value=params.min_rows), f"fewer than {params.min_rows} rows"),
        (E.ExpectColumnValuesToNotMatchRegex(column="question", regex=r"^\s*$"), "blank prompt"),
        (
            E.ExpectColumnValuesToBeBetween(column="prompt_tokens", max_value=params.max_prompt_tokens),
            f"prompt longer than {params.max_prompt_tokens} tokens",
        ),
        (
            E.ExpectColumnValuesToBeBetween(column="response_tokens", max_value=params.max_response_tokens),
            f"response longer than {params.max_response_tokens} tokens",
        ),
        (E.ExpectColumnValuesToBeInSet(column="echoes_prompt", value_set=[False]), "response repeats the prompt"),
    ]
    for column in ("prompt", "response"):
        expectations += [
            (
                E.ExpectColumnValuesToNotMatchRegexList(column=column, regex_list=list(SECRET_PATTERNS.values())),
                f"{column} contains what looks like a credential ({', '.join(SECRET_PATTERNS)})",
            ),
            (
                E.ExpectColumnValuesToNotMatchRegexList(column=column, regex_list=special),
                f"{column} contains a literal special token ({', '.join(tokenizer.all_special_tokens)})",
            ),
            (
                E.ExpectColumnValuesToNotMatchRegexList(column=column, regex_list=DAMAGE_PATTERNS),
                f"{column} contains control characters or U+FFFD (damaged text)",
            ),
        ]
    if check_leakage:
        expectations.append(
            (
                E.ExpectColumnValuesToBeInSet(
                    column="in_other_split", value_set=[False], mostly=1 - params.max_leakage_ratio
                ),
                f"prompt also in the eval split above validate.max_leakage_ratio={params.max_leakage_ratio} (leakage)",
            )
        )
    for expectation, problem in expectations:
        expectation.meta = {"problem": problem}
    return [expectation for expectation, _ in expectations]


def run_suite(
    frame: pd.DataFrame, expectations: list[gx.expectations.Expectation], name: str, docs_dir: Path | None = None
):
    """Validate `frame` in a fresh in-memory GX context; with `docs_dir`, also build Data Docs there.

    The context gets no temporary docs site of its own (GX's default would leave a folder in /tmp per run).
    """
    sites = {}
    if docs_dir:
        sites = {
            "llmops": {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            }
        }
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(), data_docs_sites=sites)
    context = gx.get_context(project_config=config, mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    suite = gx.ExpectationSuite(name="instruction-data", expectations=expectations)
    batches = (
        context.data_sources.add_pandas("llmops").add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    )
    if docs_dir is None:
        return batches.get_batch(batch_parameters={"dataframe": frame}).validate(suite, result_format="COMPLETE")
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batches, suite=context.suites.add(suite))
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            result_format="COMPLETE",
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs")],
        )
    )
    [result] = checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()
    make_offline(docs_dir)
    return result


# Data Docs load Bootstrap, jQuery and fonts from CDNs; offline those tags only stall the page. They are
# dropped and a small inline stylesheet keeps the tables readable without network.
_REMOTE_TAG = re.compile(
    r'<link[^>]*href="https?://[^"]*"[^>]*>|<script[^>]*src="https?://[^"]*"[^>]*>\s*</script>'
    r'|<img[^>]*src="https?://[^"]*"[^>]*>'
)
_OFFLINE_CSS = """<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f2f2f2; } .text-danger { color: #b00020; } .text-success { color: #1b7e2b; }
nav, .navbar, .sticky, #section-1 .col-md-2 { display: none; } a { color: #0b5cad; }
.fa-check-circle::before { content: "\\2714 pass"; } .fa-times::before { content: "\\2718 FAIL"; font-weight: bold; }
</style>"""


def make_offline(docs_dir: Path) -> None:
    for page in docs_dir.rglob("*.html"):
        html = _REMOTE_TAG.sub("", page.read_text())
        page.write_text(html.replace("</head>", _OFFLINE_CSS + "</head>", 1))


def check_split(
    params: ValidateParams,
    base_model: str,
    max_seq_len: int,
    path: Path,
    other: Path | None = None,
    docs_dir: Path | None = None,
    out: Path | None = None,
    excess_length: ExcessLength = "drop",
    chat_template: str | None = None,
    joins: Path | None = None,
) -> SplitReport:
    """Clean and validate one JSONL file. With `other` (the eval split), exact copies of its conversations are
    dropped and prompts that leak into it counted; with `joins` (the training set an incoming batch joins),
    rows already in it count as duplicates; with `out`, the cleaned rows are written to
    `out/<name>-<content hash>.jsonl`."""
    parsed = parse_jsonl(path, params.max_line_bytes)
    md5 = file_md5(path)
    if not parsed.rows:  # nothing readable (an unreadable file, or no line parsed): the suite has nothing to judge
        problems = [str(p) for p in parsed.problems] or ["no rows"]
        return SplitReport(
            path=path, format=parsed.format, rows_read=0, rows=0, md5=md5, structural=problems, failures=[]
        )
    tokenizer = load_tokenizer(base_model, chat_template)
    other_rows = [c for _, c in parse_jsonl(other, params.max_line_bytes).rows] if other else []
    joined = [c for _, c in parse_jsonl(joins, params.max_line_bytes).rows] if joins and joins.exists() else []
    cleaning = clean(
        parsed.rows,
        tokenizer,
        params,
        max_seq_len,
        excess_length,
        eval_keys=frozenset(c.key() for c in other_rows),
        seen_keys=frozenset(c.key() for c in joined),
    )
    failures = _cleaning_failures(params, max_seq_len, cleaning, len(parsed.rows))
    if cleaning.kept:
        frame = row_features(cleaning.kept, tokenizer, {c.key(c.prompt) for c in other_rows})
        site = docs_dir / path.stem if docs_dir else None  # one site per split: a rebuild would replace the other
        result = run_suite(frame, build_suite(params, tokenizer, other is not None), path.stem, site)
        failures += [
            ExpectationFailure(
                problem=r.expectation_config.meta["problem"],
                expectation=r.expectation_config.type,
                unexpected_rows=r.result.get("unexpected_count", len(frame)),
                example_lines=[
                    int(frame.line.iloc[i]) for i in r.result.get("unexpected_index_list", [])[:EXAMPLES_SHOWN]
                ],
            )
            for r in result.results
            if not r.success
        ]
    else:
        failures.append(
            ExpectationFailure(
                problem="no row left after cleaning", expectation="", unexpected_rows=0, example_lines=[]
            )
        )
    descriptions = drop_descriptions(params, max_seq_len)
    dropped = [
        DropGroup(
            reason=reason, description=descriptions[reason], rows=len(lines), example_lines=lines[:EXAMPLES_SHOWN]
        )
        for reason, lines in cleaning.dropped.items()
    ]
    changed = bool(cleaning.dropped or cleaning.truncated or cleaning.redacted)
    cleaned = cleaned_md5 = None
    if out is not None:  # named by content: never overwritten with other rows, the same path for the same rows
        scratch = out / f".{path.stem}-{os.getpid()}.jsonl"
        write_jsonl(scratch, [c for _, c in cleaning.kept])
        cleaned_md5 = file_md5(scratch)
        cleaned = out / f"{path.stem}-{cleaned_md5[:12]}.jsonl"
        os.replace(scratch, cleaned)
    return SplitReport(
        path=path,
        format=parsed.format,
        rows_read=len(parsed.rows),
        rows=len(cleaning.kept),
        md5=md5,
        dropped=dropped,
        truncated=cleaning.truncated,
        pii=dict(cleaning.pii),
        changed=changed,
        cleaned=cleaned,
        cleaned_md5=cleaned_md5,
        structural=[str(p) for p in parsed.problems],
        failures=failures,
    )


def _cleaning_failures(
    params: ValidateParams, max_seq_len: int, cleaning: Cleaning, rows: int
) -> list[ExpectationFailure]:
    """What cleaning found that fails the split: too much dropped, rows too long under `raise`, personal data
    under `pii: fail`."""
    failures = []
    dropped = sum(len(lines) for lines in cleaning.dropped.values())
    if dropped > params.max_dropped_ratio * rows:
        descriptions = drop_descriptions(params, max_seq_len)
        reasons = "; ".join(f"{descriptions[r]}: {len(lines)}" for r, lines in cleaning.dropped.items())
        failures.append(
            ExpectationFailure(
                problem=f"cleaning dropped {dropped} of {rows} rows ({dropped / rows:.0%}), above "
                f"validate.max_dropped_ratio={params.max_dropped_ratio} ({reasons})",
                expectation="max_dropped_ratio",
                unexpected_rows=dropped,
                example_lines=sorted(line for lines in cleaning.dropped.values() for line in lines)[:EXAMPLES_SHOWN],
            )
        )
    if cleaning.too_long:
        failures.append(
            ExpectationFailure(
                problem=f"conversation longer than finetune.max_seq_len={max_seq_len} tokens (data.excess_length: "
                "raise; `drop` or `truncate_prompt` would clean it)",
                expectation="excess_length",
                unexpected_rows=len(cleaning.too_long),
                example_lines=cleaning.too_long[:EXAMPLES_SHOWN],
            )
        )
    if cleaning.pii and params.pii == "fail":
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(cleaning.pii.items()))
        failures.append(
            ExpectationFailure(
                problem=f"personal data ({kinds}) with validate.pii: fail (`redact` would replace it)",
                expectation="pii",
                unexpected_rows=len(cleaning.pii_lines),
                example_lines=cleaning.pii_lines[:EXAMPLES_SHOWN],
            )
        )
    return failures


def validate_dataset(
    params: ValidateParams,
    base_model: str,
    max_seq_len: int,
    train: Path,
    eval: Path,
    docs_dir: Path | None = None,
    out: Path | None = None,
    excess_length: ExcessLength = "drop",
    chat_template: Path | None = None,
) -> DataReport:
    """Clean and validate both splits (training rows are also checked against eval for copies and leaked
    prompts); with `out`, write the cleaned splits there (they are what trains); with `docs_dir`, build Great
    Expectations Data Docs for both there."""
    template = load_chat_template(chat_template)
    options = {"excess_length": excess_length, "chat_template": template, "docs_dir": docs_dir}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    return DataReport(
        splits=[
            check_split(params, base_model, max_seq_len, train, other=eval, out=out, **options),
            check_split(params, base_model, max_seq_len, eval, out=out, **options),
        ],
        chat_template=template,
    )


def main() -> None:
    """DVC stage `validate`: keeps the report and the cleaned splits; its result is the dataset reference
    later stages read."""
    params, out = dvc_stage_args("validate")
    with atomic_dir(out) as tmp:
        report = validate_dataset(
            params.validate_,
            params.model.base,
            params.finetune.max_seq_len,
            params.data.train,
            params.data.eval,
            docs_dir=tmp / "data_docs",
            out=tmp / "cleaned",
            excess_length=params.data.excess_length,
            chat_template=params.data.chat_template,
        )
        write_json(tmp / "report.json", report.model_dump(mode="json"))
        (tmp / "report.md").write_text(report.to_markdown())
    if report.ok:
        # The cleaned files were written in the temporary folder; point the reference at their final place.
        ref = report.require_valid()
        moved = {"train": out / "cleaned" / ref.train.name, "eval": out / "cleaned" / ref.eval.name}
        save_result(ref.model_copy(update=moved), out)
    if not report.ok:
        sys.exit(str(InvalidData(report)))  # exit status 1 stops `dvc repro` before training


if __name__ == "__main__":
    main()
