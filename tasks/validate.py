"""Stop bad data at the door: structural parsing, then one Great Expectations suite over each split.

Fine-tuning fails quietly on bad data: a response truncated away supervises nothing, an eval prompt copied
into training inflates every metric, a pasted secret gets memorised, a response cut before its EOS teaches
the model never to stop. Each of those is an expectation here, with thresholds from `validate:` in
params.yaml, evaluated on columns derived with the base model's own tokenizer.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from llmops.config import ValidateParams, dvc_stage_args
from llmops.data import FIELDS, DatasetRef, Example, file_md5, parse_jsonl, tracked_version
from llmops.errors import LLMOpsError
from llmops.files import atomic_dir, save_result, write_json
from llmops.modeling import format_prompt, load_tokenizer

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # GX would otherwise try to phone home, offline here
import great_expectations as gx  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

EXAMPLES_SHOWN = 5
SECRET_PATTERNS = {
    "private key block": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "AWS access key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36,}",
    "OpenAI-style API key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}",
    "JSON web token": r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
}
# Text damage: control characters other than tab/newline, and U+FFFD left by a lossy decode upstream.
DAMAGE_PATTERNS = [r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "\ufffd"]


class ExpectationFailure(BaseModel, frozen=True):
    problem: str
    expectation: str
    unexpected_rows: int
    example_lines: list[int]

    def __str__(self) -> str:
        lines = ", ".join(map(str, self.example_lines))
        return f"{self.problem}: {self.unexpected_rows} row(s)" + (f", e.g. line(s) {lines}" if lines else "")


class SplitReport(BaseModel, frozen=True):
    path: Path
    rows: int
    md5: str
    structural: list[str]
    failures: list[ExpectationFailure]

    @property
    def ok(self) -> bool:
        return not self.structural and not self.failures

    def problems(self) -> list[str]:
        shown = self.structural[:EXAMPLES_SHOWN]
        more = len(self.structural) - len(shown)
        return shown + ([f"... and {more} more malformed line(s)"] if more else []) + [str(f) for f in self.failures]


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

    @property
    def ok(self) -> bool:
        return all(split.ok for split in self.splits)

    def require_valid(self) -> DatasetRef:
        """The dataset reference for training, or InvalidData if any split failed."""
        if not self.ok:
            raise InvalidData(self)
        train, eval_ = self.splits
        dvc_file, dvc_version = tracked_version(train.path) or (None, None)
        return DatasetRef(
            train=train.path,
            eval=eval_.path,
            train_rows=train.rows,
            eval_rows=eval_.rows,
            train_md5=train.md5,
            eval_md5=eval_.md5,
            dvc_file=dvc_file,
            dvc_version=dvc_version,
        )

    def to_markdown(self) -> str:
        lines = [f"## Data validation {'passed' if self.ok else 'FAILED'}", ""]
        for split in self.splits:
            lines += [f"### `{split.path}`: {split.rows} rows, {'ok' if split.ok else 'rejected'}", ""]
            lines += [f"- {problem}" for problem in split.problems()] or ["- every expectation met"]
            lines.append("")
        return "\n".join(lines)


def row_features(rows: list[tuple[int, Example]], tokenizer, max_seq_len: int, other_prompts: set[str]) -> pd.DataFrame:
    """One row per example with the columns the suite judges, computed with the model's tokenizer."""
    frame = pd.DataFrame(
        {"line": [n for n, _ in rows], "prompt": [e.prompt for _, e in rows], "response": [e.response for _, e in rows]}
    )
    prefix = 1 if tokenizer.bos_token_id is not None else 0
    prompt_tokens = [
        len(ids) for ids in tokenizer([format_prompt(p) for p in frame.prompt], add_special_tokens=False)["input_ids"]
    ]
    response_tokens = [len(ids) for ids in tokenizer(list(frame.response), add_special_tokens=False)["input_ids"]]
    frame["prompt_tokens"] = prompt_tokens
    frame["response_tokens"] = response_tokens
    context = frame.prompt_tokens + prefix
    # Response tokens plus EOS that survive truncation to max_seq_len: what the loss actually sees.
    frame["supervised_tokens"] = (max_seq_len - context).clip(lower=0).clip(upper=frame.response_tokens + 1)
    frame["keeps_eos"] = context + frame.response_tokens + 1 <= max_seq_len
    frame["response_chars"] = frame.response.str.strip().str.len()
    frame["is_duplicate"] = frame.duplicated(subset=list(FIELDS))
    frame["echoes_prompt"] = frame.prompt.str.strip() == frame.response.str.strip()
    frame["in_other_split"] = frame.prompt.isin(other_prompts)
    return frame


def build_suite(params: ValidateParams, tokenizer, check_leakage: bool) -> list[gx.expectations.Expectation]:
    """The instruction-data suite's expectations; each says in `meta.problem` what a failure means."""
    E = gx.expectations
    special = [re.escape(token) for token in tokenizer.all_special_tokens]
    expectations = [
        (E.ExpectTableRowCountToBeBetween(min_value=params.min_rows), f"fewer than {params.min_rows} rows"),
        (E.ExpectColumnValuesToNotMatchRegex(column="prompt", regex=r"^\s*$"), "blank prompt"),
        (
            E.ExpectColumnValuesToBeBetween(column="response_chars", min_value=params.min_response_chars),
            f"response shorter than {params.min_response_chars} characters",
        ),
        (
            E.ExpectColumnValuesToBeBetween(column="prompt_tokens", max_value=params.max_prompt_tokens),
            f"prompt longer than {params.max_prompt_tokens} tokens",
        ),
        (
            E.ExpectColumnValuesToBeBetween(column="response_tokens", max_value=params.max_response_tokens),
            f"response longer than {params.max_response_tokens} tokens",
        ),
        (
            E.ExpectColumnValuesToBeBetween(column="supervised_tokens", min_value=1),
            "no response token left after truncation to finetune.max_seq_len (nothing to learn from the row)",
        ),
        (
            E.ExpectColumnValuesToBeInSet(column="keeps_eos", value_set=[True], mostly=1 - params.max_truncated_ratio),
            "response cut before its EOS by finetune.max_seq_len (teaches the model not to stop)",
        ),
        (
            E.ExpectColumnValuesToBeInSet(
                column="is_duplicate", value_set=[False], mostly=1 - params.max_duplicate_ratio
            ),
            f"duplicate rows above validate.max_duplicate_ratio={params.max_duplicate_ratio}",
        ),
        (E.ExpectColumnValuesToBeInSet(column="echoes_prompt", value_set=[False]), "response repeats the prompt"),
    ]
    for column in FIELDS:
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
) -> SplitReport:
    """Validate one JSONL file; with `other`, also count prompts that leak into that split."""
    rows, structural = parse_jsonl(path, params.max_line_bytes)
    md5 = file_md5(path)
    if not rows:  # nothing readable (an unreadable file, or no line parsed): the suite has nothing to judge
        problems = [str(p) for p in structural] or ["no rows"]
        return SplitReport(path=path, rows=0, md5=md5, structural=problems, failures=[])
    tokenizer = load_tokenizer(base_model)
    other_prompts = {e.prompt for _, e in parse_jsonl(other, params.max_line_bytes)[0]} if other else set()
    frame = row_features(rows, tokenizer, max_seq_len, other_prompts)
    site = docs_dir / path.stem if docs_dir else None  # one site per split: a rebuild would replace the other
    result = run_suite(frame, build_suite(params, tokenizer, other is not None), path.stem, site)
    failures = [
        ExpectationFailure(
            problem=r.expectation_config.meta["problem"],
            expectation=r.expectation_config.type,
            unexpected_rows=r.result.get("unexpected_count", len(frame)),
            example_lines=[int(frame.line.iloc[i]) for i in r.result.get("unexpected_index_list", [])[:EXAMPLES_SHOWN]],
        )
        for r in result.results
        if not r.success
    ]
    return SplitReport(path=path, rows=len(frame), md5=md5, structural=[str(p) for p in structural], failures=failures)


def validate_dataset(
    params: ValidateParams, base_model: str, max_seq_len: int, train: Path, eval: Path, docs_dir: Path | None = None
) -> DataReport:
    """Validate both splits (training prompts are also checked for leakage into eval); with `docs_dir`,
    build Great Expectations Data Docs for both there."""
    return DataReport(
        splits=[
            check_split(params, base_model, max_seq_len, train, other=eval, docs_dir=docs_dir),
            check_split(params, base_model, max_seq_len, eval, docs_dir=docs_dir),
        ]
    )


def main() -> None:
    """DVC stage `validate`: keeps the report; its result is the dataset reference later stages read."""
    params, out = dvc_stage_args("validate")
    with atomic_dir(out) as tmp:
        report = validate_dataset(
            params.validate_,
            params.model.base,
            params.finetune.max_seq_len,
            params.data.train,
            params.data.eval,
            docs_dir=tmp / "data_docs",
        )
        write_json(tmp / "report.json", report.model_dump(mode="json"))
        (tmp / "report.md").write_text(report.to_markdown())
        if report.ok:
            save_result(report.require_valid(), tmp)
    if not report.ok:
        sys.exit(str(InvalidData(report)))  # exit status 1 stops `dvc repro` before training


if __name__ == "__main__":
    main()
