"""Stop bad data at the door: structural parsing, cleaning as the trainers do it, then one Great Expectations
suite over each cleaned split.

Fine-tuning fails quietly on bad data: a conversation truncated mid-answer teaches the model never to stop,
an eval conversation copied into training inflates every metric, a pasted secret or a customer's e-mail gets
memorised. What trainers (Axolotl, TRL, torchtune, FastChat, LLaMA-Factory) silently drop or fix is dropped or
fixed here too, but counted and reported by reason: conversations whose turns cannot train (a system turn
after the first, no assistant turn, a last question without its answer), exact duplicates (also of eval
rows), assistant turns too short to teach anything, and conversations longer than `finetune.max_seq_len` (or
shortened: `data.excess_length`). A conversation that opens with the assistant (an export cut mid-way, an
agent's greeting) is rendered as it is when the chat template accepts it, and repaired (its opening assistant
turns dropped) when the template refuses it. Personal data is redacted (`validate.pii`). The split fails when
too much had to go (`validate.max_dropped_ratio`), and for what is a real defect: an unreadable file or line,
credentials, literal special tokens, damaged text, eval leakage.

Each conversation is read, cleaned and rendered once (`llmops.chat`), in chunks whose token counts come from
the fast tokenizer's batch API (Rust, every core) while the next chunk is cleaned; what is kept is written as
it goes, so memory does not grow with the split. The suite judges columns of numbers and flags computed on the
way, not the raw text. With an output folder, the result is kept under the split's content hash: the same
split checked again (a drift retrain's ingest, then its validate stage) is walked once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel

from llmops import chat, data, privacy
from llmops.chat import RenderedText, TemplateRefused, count_tokens, load_chat_template, render, render_text
from llmops.config import ValidateParams, dvc_stage_args
from llmops.data import (
    STRUCTURE_PROBLEMS,
    Conversation,
    DatasetRef,
    RowId,
    Turn,
    split_md5,
    split_readers,
    structure_problem,
    tracked_version,
)
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

log = logging.getLogger(__name__)
_progress = logging.getLogger("llmops.progress")  # lines the terminal shows (`llmops.console`)
PROGRESS_BYTES = 64 << 20  # splits larger than this report progress

EXAMPLES_SHOWN = 5
CHUNK_ROWS = 256  # conversations tokenized per batch call: enough for every core, a few MB of text
SECRET_PATTERNS = privacy.SECRET_PATTERNS
# Text damage: control characters other than tab/newline, and U+FFFD left by a lossy decode upstream.
DAMAGE_PATTERNS = [r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "\ufffd"]
ExcessLength = Literal["drop", "truncate_prompt", "raise"]


class ExpectationFailure(BaseModel, frozen=True):
    problem: str
    expectation: str
    unexpected_rows: int
    example_lines: list[RowId]

    def __str__(self) -> str:
        lines = ", ".join(map(str, self.example_lines))
        return f"{self.problem}: {self.unexpected_rows} row(s)" + (f", e.g. line(s) {lines}" if lines else "")


class RowGroup(BaseModel, frozen=True):
    """Rows cleaning removed (or repaired) for one reason."""

    reason: str  # e.g. duplicate | in_eval | short_response | excess_length | ends_on_user_turn | ...
    description: str
    rows: int
    example_lines: list[RowId]

    def __str__(self) -> str:
        return f"{self.description}: {self.rows} row(s), e.g. line(s) {', '.join(map(str, self.example_lines))}"


class SplitReport(BaseModel, frozen=True):
    path: Path  # the split as given: a JSONL file, or a folder of them
    format: str | None  # the detected row shape (a folder's shapes joined with "+")
    rows_read: int
    rows: int  # kept after cleaning: what trains (or evaluates)
    md5: str  # of the split as given (`llmops.data.split_md5`)
    dropped: list[RowGroup] = []
    repaired: list[RowGroup] = []  # rows kept after a repair (opening assistant turns dropped)
    truncated: int = 0  # rows shortened to fit (data.excess_length: truncate_prompt)
    pii: dict[str, int] = {}  # personal data found, by kind (redacted unless validate.pii says otherwise)
    changed: bool = False  # cleaning changed something: the cleaned file, not the raw one, must train
    cleaned: Path | None = None  # the cleaned rows (messages shape), when an output folder was given
    cleaned_md5: str | None = None
    structural: list[str]  # what makes the file itself unreadable as a dataset (one entry per line)
    structural_count: int = 0  # all of them (`structural` keeps the first ones)
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
        """Rows read, kept, dropped and repaired (by reason), shortened and redacted: the numbers the run logs."""
        return {
            "rows_read": self.rows_read,
            "rows": self.rows,
            "dropped": self.dropped_rows,
            **{f"dropped.{group.reason}": group.rows for group in self.dropped},
            "repaired": sum(group.rows for group in self.repaired),
            **{f"repaired.{group.reason}": group.rows for group in self.repaired},
            "truncated": self.truncated,
            **{f"pii.{kind}": n for kind, n in self.pii.items()},
        }

    def problems(self) -> list[str]:
        shown = self.structural[:EXAMPLES_SHOWN]
        more = max(len(self.structural), self.structural_count) - len(shown)
        return shown + ([f"... and {more} more malformed line(s)"] if more else []) + [str(f) for f in self.failures]

    def cleaning_lines(self) -> list[str]:
        """What cleaning did, one line each (empty when it changed nothing)."""
        lines = [f"dropped {group}" for group in self.dropped] + [f"repaired {group}" for group in self.repaired]
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

        def by_reason(groups: str) -> dict[str, int]:
            return dict(sum((Counter({g.reason: g.rows for g in getattr(s, groups)}) for s in self.splits), Counter()))

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
            dropped=by_reason("dropped"),
            repaired=by_reason("repaired"),
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
            for title, groups in (("dropped", split.dropped), ("repaired", split.repaired)):
                if groups:
                    lines += [f"| {title} because | rows | e.g. lines |", "|---|---|---|"]
                    lines += [
                        f"| {g.description} | {g.rows} | {', '.join(map(str, g.example_lines))} |" for g in groups
                    ]
                    lines.append("")
            done = [line for line in split.cleaning_lines() if not line.startswith(("dropped ", "repaired "))]
            lines += [f"- {line}" for line in done]
            lines += [f"- {problem}" for problem in split.problems()] or ["- every expectation met"]
            lines.append("")
        return "\n".join(lines)


def _trained_file(split: SplitReport) -> Path:
    if split.cleaned:
        return split.cleaned
    if split.changed:
        raise LLMOpsError(
            f"Cleaning changed {split.path}, but no output folder was given to write the cleaned split: pass "
            "`out` to validate_dataset (the flow and `dvc repro` do)."
        )
    return split.path


# --- Cleaning: what trainers drop or fix silently, dropped or fixed here and counted. -----------------------


def drop_descriptions(params: ValidateParams, max_seq_len: int) -> dict[str, str]:
    return {
        **STRUCTURE_PROBLEMS,
        "template_refused": "the chat template cannot render it, even without its opening assistant turns",
        "duplicate": "duplicate rows (exact copy of an earlier conversation)",
        "in_eval": "exact copy of an eval-split conversation (leakage)",
        "short_response": f"response shorter than {params.min_response_chars} characters (an assistant turn)",
        "excess_length": f"longer than finetune.max_seq_len={max_seq_len} tokens (data.excess_length)",
    }


REPAIR_DESCRIPTIONS = {
    "opening_assistant_turns": "opening assistant turns dropped (the chat template refuses a conversation that "
    "opens with the assistant)",
}


class _Scanner:
    """The defects the suite refuses and the personal data cleaning counts, found in one pass over each
    turn's text. The regular expressions are the slow part (tens of MB/s each): each runs only on text that
    holds what its match cannot do without (an `@`, digits, a credential's fixed prefix), checked first at
    the speed of a substring search."""

    # The fixed text each credential pattern (privacy.SECRET_PATTERNS) cannot match without; a pattern not
    # listed here runs on every text.
    SECRET_PREFIXES = {
        "private key block": ("-----BEGIN",),
        "AWS access key": ("AKIA", "ASIA"),
        "GitHub token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
        "OpenAI-style API key": ("sk-",),
        "Slack token": ("xox",),
        "Google API key": ("AIza",),
        "JSON web token": ("eyJ",),
    }

    def __init__(self, special_tokens: Iterable[str]):
        prefixed = [name for name in SECRET_PATTERNS if name in self.SECRET_PREFIXES]
        self.prefixes = [prefix for name in prefixed for prefix in self.SECRET_PREFIXES[name]]
        self.prefixed = re.compile("|".join(SECRET_PATTERNS[name] for name in prefixed))
        self.unprefixed = [re.compile(p) for name, p in SECRET_PATTERNS.items() if name not in self.SECRET_PREFIXES]
        special = sorted(set(special_tokens), key=len, reverse=True)
        self.special = re.compile("|".join(map(re.escape, special))) if special else None
        self.damage = re.compile("|".join(DAMAGE_PATTERNS))

    def credential(self, text: str) -> bool:
        if any(prefix in text for prefix in self.prefixes) and self.prefixed.search(text):
            return True
        return any(pattern.search(text) for pattern in self.unprefixed)

    def defects(self, text: str) -> tuple[bool, bool, bool]:
        """(credential, literal special token, damaged text)."""
        special = self.special is not None and self.special.search(text) is not None
        return self.credential(text), special, self.damage.search(text) is not None


# The columns the suite judges, one row per kept conversation (`row` says where it is).
FEATURES = (
    "row",
    "question_blank",
    "prompt_tokens",
    "response_tokens",
    "echoes_prompt",
    "prompt_credential",
    "response_credential",
    "prompt_special_token",
    "response_special_token",
    "prompt_damaged",
    "response_damaged",
    "in_other_split",
)


@dataclass
class _Row:
    """A conversation on its way through cleaning."""

    index: int  # in the order rows were read
    where: RowId
    conversation: Conversation
    rendered: RenderedText
    defective: bool  # holds a credential, a special token or damaged text: kept for the suite to refuse


@dataclass
class Cleaning:
    """What one walk over a split did: kept rows are written to `sink` as they are decided."""

    rows_read: int = 0
    kept: int = 0
    dropped: dict[str, list[tuple[int, RowId]]] = field(default_factory=dict)  # reason -> (order read, row)
    repaired: dict[str, list[RowId]] = field(default_factory=dict)
    too_long: list[RowId] = field(default_factory=list)  # over max_seq_len, with data.excess_length: raise
    truncated: int = 0
    pii: Counter = field(default_factory=Counter)
    pii_rows: list[RowId] = field(default_factory=list)
    redacted: int = 0
    features: list[tuple] = field(default_factory=list)

    def drop(self, reason: str, index: int, where: RowId) -> None:
        self.dropped.setdefault(reason, []).append((index, where))

    def dropped_rows(self, reason: str) -> list[RowId]:
        """Where the rows dropped for `reason` are, in the order they were read."""
        return [where for _, where in sorted(self.dropped[reason], key=lambda item: item[0])]

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.repaired or self.truncated or self.redacted)


class _Walk:
    """Clean a split's rows in order: `prepare` each (structure, personal data, duplicates, rendering, in
    Python), then `finish` it once its token count is known (lengths, features, written out)."""

    def __init__(
        self,
        tokenizer,
        params: ValidateParams,
        max_seq_len: int,
        excess_length: ExcessLength,
        eval_keys: frozenset[str],
        seen_keys: frozenset[str],
        other_prompts: frozenset[str],
        sink,
    ):
        self.tokenizer, self.params, self.sink = tokenizer, params, sink
        self.max_seq_len, self.excess_length = max_seq_len, excess_length
        self.eval_keys, self.seen, self.other_prompts = eval_keys, set(seen_keys), other_prompts
        special = [*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values())]
        self.scan = _Scanner(special)
        self.result = Cleaning()

    def prepare(self, where: RowId, conversation: Conversation) -> _Row | None:
        result = self.result
        result.rows_read += 1
        index = result.rows_read
        problem = structure_problem(conversation)
        if problem:
            result.drop(problem, index, where)
            return None
        defective = any(any(self.scan.defects(t.content)) for t in conversation.turns)
        if not defective:  # a defect is never cleaned away: it stays for the suite to fail the split
            conversation = self._redacted(where, conversation)
            key = conversation.key()
            trained = [t for t in conversation.turns if t.role == "assistant" and t.train]
            reason = None
            if any(len(t.content.strip()) < self.params.min_response_chars for t in trained):
                reason = "short_response"
            elif key in self.eval_keys:
                reason = "in_eval"
            elif key in self.seen:
                reason = "duplicate"
            self.seen.add(key)
            if reason:
                result.drop(reason, index, where)
                return None
        try:
            rendered = render_text(self.tokenizer, conversation.turns)
        except TemplateRefused:
            if not conversation.opening_assistant_turns:
                result.drop("template_refused", index, where)
                return None
            conversation = conversation.without_opening_assistant_turns()
            problem = structure_problem(conversation)
            try:
                rendered = None if problem else render_text(self.tokenizer, conversation.turns)
            except TemplateRefused:
                problem = "template_refused"
            if problem:
                result.drop(problem, index, where)
                return None
            result.repaired.setdefault("opening_assistant_turns", []).append(where)
        return _Row(index, where, conversation, rendered, defective)

    def _redacted(self, where: RowId, conversation: Conversation) -> Conversation:
        found = [privacy.count(t.content, privacy.PII_KINDS) for t in conversation.turns]
        total = sum(found, Counter())
        if not total:
            return conversation
        self.result.pii += total
        self.result.pii_rows.append(where)
        if self.params.pii != "redact":
            return conversation
        self.result.redacted += 1
        turns = tuple(
            replace(t, content=privacy.redact(t.content, privacy.PII_KINDS)) if kinds else t
            for t, kinds in zip(conversation.turns, found, strict=True)
        )
        return Conversation(turns)

    def finish(self, row: _Row, total: int, prompt: int) -> None:
        result, conversation = self.result, row.conversation
        if total > self.max_seq_len and not row.defective:
            if self.excess_length == "raise":
                result.too_long.append(row.where)
                return
            shorter = None
            if self.excess_length == "truncate_prompt":
                shorter = truncate_prompt(self.tokenizer, conversation, self.max_seq_len)
            if shorter is None:
                result.drop("excess_length", row.index, row.where)
                return
            conversation = shorter
            [count] = count_tokens(self.tokenizer, [render_text(self.tokenizer, conversation.turns)])
            total, prompt = count.total, count.prompt
            result.truncated += 1
        result.kept += 1
        self.sink.write(json.dumps(conversation.to_row(), ensure_ascii=False) + "\n")
        result.features.append(self._features(row, conversation, total, prompt))

    def _features(self, row: _Row, conversation: Conversation, total: int, prompt: int) -> tuple:
        question, answer = conversation.last_user, conversation.reference
        flags = [False] * 6  # credential, special token, damaged: of the prompt, then of the response
        if row.defective:
            prompt_defects = [self.scan.defects(t.content) for t in conversation.prompt] or [(False,) * 3]
            flags = [*map(any, zip(*prompt_defects, strict=True)), *self.scan.defects(answer)]
        return (
            str(row.where),
            not question.strip(),
            prompt,
            total - prompt,
            question.strip() == answer.strip(),
            flags[0],
            flags[3],
            flags[1],
            flags[4],
            flags[2],
            flags[5],
            bool(self.other_prompts) and conversation.key(conversation.prompt) in self.other_prompts,
        )


def clean(
    rows: Iterable[tuple[RowId, Conversation]],
    tokenizer,
    params: ValidateParams,
    max_seq_len: int,
    excess_length: ExcessLength = "drop",
    eval_keys: frozenset[str] = frozenset(),
    seen_keys: frozenset[str] = frozenset(),
    other_prompts: frozenset[str] = frozenset(),
    sink=None,
) -> Cleaning:
    """Drop what cannot train (see `structure_problem`), redact personal data, drop short answers, duplicates
    (also of `seen_keys`, e.g. the training set an incoming batch joins) and copies of eval rows
    (`eval_keys`), repair or drop what the chat template refuses, and fit every row to `max_seq_len`; kept
    rows go to `sink` (a text file) in the `messages` shape, with their features in `Cleaning.features`.

    A row with a defect the suite refuses (a credential, a literal special token, damaged text) is never
    dropped: it stays for the suite to fail the file, so a defect cannot hide in a row that is also too long.

    Tokenizing is the costly part: a chunk of rows is tokenized in a worker thread (the Rust tokenizer
    releases the GIL and uses every core) while this thread prepares the next chunk."""
    walk = _Walk(tokenizer, params, max_seq_len, excess_length, eval_keys, seen_keys, other_prompts, sink or _Null())
    rows = iter(rows)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmops-tokenize") as tokenizing:
        pending = None  # the previous chunk, and its token counts on the way
        while True:
            batch = list(islice(rows, CHUNK_ROWS))
            chunk = [row for row in (walk.prepare(*item) for item in batch) if row is not None]
            if pending is not None:
                for row, count in zip(pending[0], pending[1].result(), strict=True):
                    walk.finish(row, count.total, count.prompt)
            counting = tokenizing.submit(count_tokens, tokenizer, [row.rendered for row in chunk]) if chunk else None
            pending = (chunk, counting) if chunk else None
            if not batch:
                break
    return walk.result


class _Null:
    def write(self, text: str) -> None:
        pass


def truncate_prompt(tokenizer, conversation: Conversation, max_seq_len: int) -> Conversation | None:
    """The conversation cut to `max_seq_len` tokens from the front: the system turn and the whole last answer
    stay; whole earlier exchanges go first, then the start of the last question. None if even that cannot fit."""
    turns = conversation.turns  # it ends on its last answer
    system, body = (turns[:1], turns[1:]) if turns[0].role == "system" else ((), turns)

    def fits(candidate: tuple[Turn, ...]) -> bool:
        try:
            return len(render(tokenizer, Conversation(system + candidate))[0]) <= max_seq_len
        except TemplateRefused:
            return False

    while not fits(body):
        later_users = [i for i, t in enumerate(body) if t.role == "user" and i > 0]
        if not later_users:
            break
        body = body[later_users[0] :]
    else:
        return Conversation(system + body)
    question, rest = body[0], body[1:]
    if question.role != "user":
        return None
    ids = tokenizer(question.content, add_special_tokens=False)["input_ids"]
    room = max_seq_len - len(render(tokenizer, Conversation(system + (Turn("user", ""),) + rest))[0])
    while room > 0:
        candidate = (Turn("user", tokenizer.decode(ids[-room:]).strip()),) + rest
        if fits(candidate):
            return Conversation(system + candidate)
        room -= 1
    return None


def build_suite(params: ValidateParams, tokenizer, check_leakage: bool) -> list[gx.expectations.Expectation]:
    """The instruction-data suite's expectations over a cleaned split's features (`FEATURES`); each says in
    `meta.problem` what a failure means."""
    E = gx.expectations

    def never(column: str) -> gx.expectations.Expectation:
        return E.ExpectColumnValuesToBeInSet(column=column, value_set=[False])

    special = ", ".join(tokenizer.all_special_tokens)
    expectations = [
        (E.ExpectTableRowCountToBeBetween(min_value=params.min_rows), f"fewer than {params.min_rows} rows"),
        (never("question_blank"), "blank prompt"),
        (
            E.ExpectColumnValuesToBeBetween(column="prompt_tokens", max_value=params.max_prompt_tokens),
            f"prompt longer than {params.max_prompt_tokens} tokens",
        ),
        (
            E.ExpectColumnValuesToBeBetween(column="response_tokens", max_value=params.max_response_tokens),
            f"response longer than {params.max_response_tokens} tokens",
        ),
        (never("echoes_prompt"), "response repeats the prompt"),
    ]
    for column in ("prompt", "response"):
        expectations += [
            (
                never(f"{column}_credential"),
                f"{column} contains what looks like a credential ({', '.join(SECRET_PATTERNS)})",
            ),
            (never(f"{column}_special_token"), f"{column} contains a literal special token ({special})"),
            (never(f"{column}_damaged"), f"{column} contains control characters or U+FFFD (damaged text)"),
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


# --- One split: walked once (or taken from the cache of an identical walk), then judged by the suite. -------

# Code that decides what a walk finds: a change to any of it must not reuse a cached walk.
_CODE = hashlib.sha256(
    b"".join(Path(source).read_bytes() for source in (__file__, chat.__file__, data.__file__, privacy.__file__))
).hexdigest()


class Walked(BaseModel):
    """What one walk over a split found (kept under its cache key, beside the features the suite judges)."""

    format: str | None
    rows_read: int
    rows: int
    dropped: list[RowGroup]
    repaired: list[RowGroup]
    too_long: list[RowId]
    truncated: int
    pii: dict[str, int]
    pii_rows: list[RowId]
    changed: bool
    structural: list[str]
    structural_count: int
    cleaned: Path | None
    cleaned_md5: str | None


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
    """Clean and validate one split: a JSONL file, or a folder of them (each file in its own shape; rows are
    then named `<file>:<line>`). With `other` (the eval split), exact copies of its conversations are dropped
    and prompts that leak into it counted; with `joins` (the training set an incoming batch joins), rows
    already in it count as duplicates; with `out`, the cleaned rows are written to
    `out/<name>-<content hash>.jsonl`, and the walk is kept there: the same split, checked again with the
    same settings, is not walked again (the suite still judges it)."""
    readers = split_readers(path, params.max_line_bytes)  # the split exists, and which files it has
    md5 = split_md5(path)
    tokenizer = load_tokenizer(base_model, chat_template)
    cache = None
    if out is not None:
        identity = [_CODE, params.model_dump(mode="json"), max_seq_len, excess_length, _tokenizer_digest(tokenizer)]
        identity += [[r.path.name, r.label is not None] for r in readers] + [md5]
        identity += [other and split_md5(other), joins and joins.exists() and split_md5(joins)]
        key = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:32]
        cache = out / ".walks" / key
    walked, frame = _cached_walk(cache) if cache else (None, None)
    if walked is None:
        walked, frame = _walk(readers, tokenizer, params, max_seq_len, excess_length, path, other, joins, out)
        if cache is not None:
            _keep_walk(cache, walked, frame)
    if not walked.rows_read:  # nothing readable: the suite has nothing to judge
        return SplitReport(
            path=path,
            format=walked.format,
            rows_read=0,
            rows=0,
            md5=md5,
            structural=walked.structural or ["no rows"],
            structural_count=walked.structural_count,
            failures=[],
        )
    failures = _cleaning_failures(params, max_seq_len, walked)
    if len(frame):
        site = docs_dir / path.stem if docs_dir else None  # one site per split: a rebuild would replace the other
        result = run_suite(frame, build_suite(params, tokenizer, other is not None), path.stem, site)
        failures += [
            ExpectationFailure(
                problem=r.expectation_config.meta["problem"],
                expectation=r.expectation_config.type,
                unexpected_rows=r.result.get("unexpected_count", len(frame)),
                example_lines=[
                    _row_id(frame.row.iloc[i]) for i in r.result.get("unexpected_index_list", [])[:EXAMPLES_SHOWN]
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
    return SplitReport(
        path=path,
        md5=md5,
        failures=failures,
        **walked.model_dump(exclude={"too_long", "pii_rows"}),
    )


def _tokenizer_digest(tokenizer) -> str:
    """What makes two tokenizers count alike: the vocabulary and rules, the template, the special tokens."""
    state = [tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template, tokenizer.special_tokens_map]
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()


def _row_id(value: str) -> RowId:
    return int(value) if value.isdigit() else value


def _walk(
    readers, tokenizer, params, max_seq_len, excess_length, path: Path, other, joins, out: Path | None
) -> tuple[Walked, pd.DataFrame]:
    """Read, clean and measure every row once; write what is kept to `out` (named by its content)."""
    other_keys = [c.keys() for _, c in _rows(split_readers(other, params.max_line_bytes))] if other else []
    joined = split_readers(joins, params.max_line_bytes) if joins and joins.exists() else []
    scratch = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        scratch = out / f".{path.stem}-{os.getpid()}-{os.urandom(4).hex()}.jsonl"
    try:
        with scratch.open("w", encoding="utf-8") if scratch else _NoFile() as sink:
            cleaning = clean(
                _rows(readers, progress=path),
                tokenizer,
                params,
                max_seq_len,
                excess_length,
                eval_keys=frozenset(key for key, _ in other_keys),
                seen_keys=frozenset(c.key() for _, c in _rows(joined)),
                other_prompts=frozenset(prompt for _, prompt in other_keys),
                sink=sink,
            )
        cleaned = cleaned_md5 = None
        if scratch is not None:  # named by content: never overwritten with other rows, the same path for the same rows
            cleaned_md5 = hashlib.md5(scratch.read_bytes()).hexdigest()
            cleaned = out / f"{path.stem}-{cleaned_md5[:12]}.jsonl"
            os.replace(scratch, cleaned)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
    descriptions = drop_descriptions(params, max_seq_len)
    structural = [str(p) for r in readers for p in r.problems]
    formats = list(dict.fromkeys(r.format for r in readers if r.format))
    walked = Walked(
        format="+".join(formats) or None,
        rows_read=cleaning.rows_read,
        rows=cleaning.kept,
        dropped=[
            RowGroup(
                reason=reason,
                description=descriptions[reason],
                rows=len(rows),
                example_lines=cleaning.dropped_rows(reason)[:EXAMPLES_SHOWN],
            )
            for reason, rows in cleaning.dropped.items()
        ],
        repaired=[
            RowGroup(
                reason=kind, description=REPAIR_DESCRIPTIONS[kind], rows=len(rows), example_lines=rows[:EXAMPLES_SHOWN]
            )
            for kind, rows in cleaning.repaired.items()
        ],
        too_long=cleaning.too_long,
        truncated=cleaning.truncated,
        pii=dict(cleaning.pii),
        pii_rows=cleaning.pii_rows,
        changed=cleaning.changed,
        structural=structural,
        structural_count=sum(r.problem_count for r in readers),
        cleaned=cleaned,
        cleaned_md5=cleaned_md5,
    )
    log.info("walked %s: %d rows read, %d kept", path, walked.rows_read, walked.rows)
    return walked, pd.DataFrame.from_records(cleaning.features, columns=list(FEATURES))


class _NoFile:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _rows(readers, progress: Path | None = None) -> Iterator[tuple[RowId, Conversation]]:
    """The rows of every reader in turn; with `progress`, a line at each quarter of a large split (the
    terminal shows it, as it shows a run's stages)."""
    total = sum(r.path.stat().st_size for r in readers) if progress else 0
    quarter = 1
    for reader in readers:
        done = sum(r.bytes_read for r in readers if r is not reader)
        for row in reader:
            yield row
            if total > PROGRESS_BYTES and (done + reader.bytes_read) * 4 >= quarter * total:
                rows = sum(r.rows_read for r in readers)
                _progress.info("  validating  %s  %d%%  %s conversations", progress, 25 * quarter, f"{rows:,}")
                quarter += 1


def _cached_walk(cache: Path) -> tuple[Walked | None, pd.DataFrame | None]:
    """A walk kept under this key, if it and the cleaned file it wrote are still there."""
    try:
        walked = Walked.model_validate_json((cache / "walk.json").read_text())
        frame = pd.read_parquet(cache / "features.parquet")
    except (OSError, ValueError):
        return None, None
    if walked.cleaned is not None and not walked.cleaned.is_file():
        return None, None
    log.info("split unchanged since %s was validated: its walk is reused", cache)
    return walked, frame


def _keep_walk(cache: Path, walked: Walked, frame: pd.DataFrame) -> None:
    with atomic_dir(cache) as tmp:
        frame.to_parquet(tmp / "features.parquet")
        (tmp / "walk.json").write_text(walked.model_dump_json())


def _cleaning_failures(params: ValidateParams, max_seq_len: int, walked: Walked) -> list[ExpectationFailure]:
    """What cleaning found that fails the split: too much dropped, rows too long under `raise`, personal data
    under `pii: fail`."""
    failures = []
    dropped, rows = sum(g.rows for g in walked.dropped), walked.rows_read
    if dropped > params.max_dropped_ratio * rows:
        reasons = "; ".join(f"{g.description}: {g.rows}" for g in walked.dropped)
        examples = [line for g in walked.dropped for line in g.example_lines]
        failures.append(
            ExpectationFailure(
                problem=f"cleaning dropped {dropped} of {rows} rows ({dropped / rows:.0%}), above "
                f"validate.max_dropped_ratio={params.max_dropped_ratio} ({reasons})",
                expectation="max_dropped_ratio",
                unexpected_rows=dropped,
                example_lines=sorted(examples, key=_order)[:EXAMPLES_SHOWN],
            )
        )
    if walked.too_long:
        failures.append(
            ExpectationFailure(
                problem=f"conversation longer than finetune.max_seq_len={max_seq_len} tokens (data.excess_length: "
                "raise; `drop` or `truncate_prompt` would clean it)",
                expectation="excess_length",
                unexpected_rows=len(walked.too_long),
                example_lines=walked.too_long[:EXAMPLES_SHOWN],
            )
        )
    if walked.pii and params.pii == "fail":
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(walked.pii.items()))
        failures.append(
            ExpectationFailure(
                problem=f"personal data ({kinds}) with validate.pii: fail (`redact` would replace it)",
                expectation="pii",
                unexpected_rows=len(walked.pii_rows),
                example_lines=walked.pii_rows[:EXAMPLES_SHOWN],
            )
        )
    return failures


def _order(where: RowId) -> tuple:
    """Rows in reading order: by file name, then line."""
    if isinstance(where, int):
        return ("", where)
    name, _, line = where.rpartition(":")
    return (name, int(line))


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
    """Clean and validate both splits (each a JSONL file or a folder of them; training rows are also checked
    against eval for copies and leaked prompts); with `out`, write the cleaned splits there (they are what
    trains); with `docs_dir`, build Great Expectations Data Docs for both there."""
    template = load_chat_template(chat_template)
    options = {"excess_length": excess_length, "chat_template": template, "docs_dir": docs_dir, "out": out}
    return DataReport(
        splits=[
            check_split(params, base_model, max_seq_len, train, other=eval, **options),
            check_split(params, base_model, max_seq_len, eval, **options),
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
