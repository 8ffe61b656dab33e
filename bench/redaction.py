"""Redaction (`llmops.privacy`): precision and recall per kind on the labelled set, against the digit-run and
e-mail patterns it replaced; and how its time grows with adversarial inputs of growing size.

`python bench/redaction.py` prints the figures; `make bench ONLY=redaction` records them. `score` is also what
tests/llmops/test_privacy.py holds to the thresholds (correctness there, time only here).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from llmops import privacy

LABELLED = Path(__file__).resolve().parents[1] / "tests" / "data" / "redaction_set.jsonl"
PRECISION, RECALL = 0.95, 0.90  # what the set must show, per kind
Detector = Callable[[str], list[tuple[int, int, str]]]


def load_labelled(path: Path = LABELLED) -> list[dict]:
    """Rows of {"text", "spans": [{"start", "end", "kind", "text"}]}: phone numbers and e-mail addresses of
    several countries, cards, credentials, and dates, times, IP addresses and ranges, versions, amounts, code
    and log lines that hold none. Written by hand; every phone number is in its country's numbering plan."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Score:
    found: int = 0  # spans the detector reported
    labelled: int = 0  # spans the set holds
    right: int = 0  # reported spans that are labelled spans of the same kind

    @property
    def precision(self) -> float:
        return self.right / self.found if self.found else 1.0

    @property
    def recall(self) -> float:
        return self.right / self.labelled if self.labelled else 1.0


def _alnum(text: str, start: int, end: int) -> frozenset[int]:
    """The positions that carry the information: a span is right when it hides the same letters and digits as
    the labelled one, whatever spaces, brackets or dashes around it it takes or leaves."""
    return frozenset(i for i in range(start, end) if text[i].isalnum())


def score(rows: Iterable[dict], detect: Detector) -> dict[str, Score]:
    scores: dict[str, Score] = {}
    for row in rows:
        text = row["text"]
        labelled = {(s["kind"], _alnum(text, s["start"], s["end"])) for s in row["spans"]}
        found = {(kind, _alnum(text, start, end)) for start, end, kind in detect(text)}
        for kind, _ in labelled:
            scores.setdefault(kind, Score()).labelled += 1
        for kind, positions in found:
            entry = scores.setdefault(kind, Score())
            entry.found += 1
            entry.right += (kind, positions) in labelled
    return scores


def ours(text: str) -> list[tuple[int, int, str]]:
    return privacy._matches(text, privacy.KINDS, privacy.PHONE_REGIONS)


# What llmops.privacy used before (commit 71a7e55): a digit-run phone pattern and a backtracking e-mail pattern.
_OLD_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OLD_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,5}(?![\w-])")


def _old_is_phone(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    if re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", match):
        return False
    return 9 <= len(digits) <= 15 and (match.startswith("+") or re.search(r"[ .()-]", match) is not None)


def old(text: str) -> list[tuple[int, int, str]]:
    """The old detector for e-mail and phone (credentials and cards are unchanged)."""
    spans = [s for s in ours(text) if s[2] not in ("email", "phone")]
    taken = {i for start, end, _ in spans for i in range(start, end)}
    for kind, pattern in (("email", _OLD_EMAIL), ("phone", _OLD_PHONE)):
        for m in pattern.finditer(text):
            if (kind == "email" or _old_is_phone(m.group())) and not taken & set(range(*m.span())):
                spans.append((*m.span(), kind))
                taken |= set(range(*m.span()))
    return spans


def quality_figures() -> list[dict]:
    rows = load_labelled()
    new, before = score(rows, ours), score(rows, old)
    credentials = [k for k in new if k in privacy.CREDENTIAL_KINDS]
    figures = []
    for kind in ("phone", "email", "card"):
        for measure in ("precision", "recall"):
            figures.append(
                {
                    "name": f"redaction_{kind}_{measure}",
                    "ours": getattr(new[kind], measure),
                    "baseline": getattr(before[kind], measure),
                    "unit": measure,
                    "detail": f"{new[kind].labelled} labelled {kind} spans in {len(rows)} hand-written rows "
                    f"(tests/data/redaction_set.jsonl; required: precision >= {PRECISION}, recall >= {RECALL}); "
                    f"ours {new[kind].right}/{new[kind].found} found right vs the digit-run/regex detector it "
                    f"replaced {before[kind].right}/{before[kind].found}",
                }
            )
    worst = min(min(new[k].precision, new[k].recall) for k in credentials)
    figures.append(
        {
            "name": "redaction_credentials_worst",
            "ours": worst,
            "baseline": PRECISION,
            "unit": "precision/recall",
            "detail": f"lowest precision or recall over the credential kinds in the set ({', '.join(credentials)}) "
            f"against the required {PRECISION}",
        }
    )
    return figures


def _repeat(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def _generated(make: Callable[[random.Random], str], size: int) -> str:
    """Text of `size` characters from `make`, never repeating itself (a cache cannot help)."""
    rng, parts, length = random.Random(size), [], 0
    while length < size:
        parts.append(make(rng))
        length += len(parts[-1])
    return "".join(parts)[:size]


def _log_line(r: random.Random) -> str:
    when = f"2023-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} {r.randint(0, 23):02d}:{r.randint(0, 59):02d}:00"
    request = f"GET /v1/{r.randrange(10**6)} {r.choice([200, 404, 503])} {r.randrange(10**7)}"
    return f"{when} {request} from 10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)}\n"


# Inputs that make a backtracking pattern (or the phone matcher) do the most work per character; each is
# timed at a size and at 8x that size: linear time is a ratio near 8.
ADVERSARIAL = {
    "email_dots": (lambda n: _repeat("a.", n), 128_000),  # the old pattern: 0.85 s at 32k, x4 per doubling
    "email_ats": (lambda n: _repeat("a@a.", n), 128_000),
    "jwt_dashes": (lambda n: _repeat("eyJ-", n), 128_000),
    "key_headers": (lambda n: _repeat("-----BEGIN RSA PRIVATE KEY-----", n), 128_000),
    "prose": (
        lambda n: _generated(lambda r: r.choice(["the ", "model ", "answers, ", "then ", "stops. "]), n),
        128_000,
    ),
    "log_lines": (lambda n: _generated(_log_line, n), 16_000),
    "digit_groups": (lambda n: _generated(lambda r: f"{r.randrange(10**4)} ", n), 16_000),
    "phone_numbers": (lambda n: _generated(lambda r: f"06{r.randrange(10**8):08d} ", n), 16_000),
}


def growth_figures() -> list[dict]:
    figures = []
    for name, (make, size) in ADVERSARIAL.items():
        seconds = []
        for n in (size, 8 * size):
            text = make(n)
            privacy._window_phones.cache_clear()
            start = time.perf_counter()
            privacy.redact(text)
            seconds.append(time.perf_counter() - start)
        figures.append(
            {
                "name": f"redaction_growth_{name}",
                "ours": seconds[1] / seconds[0],
                "baseline": 8.0,
                "unit": "time ratio",
                "detail": f"redact() time at {8 * size:,} vs {size:,} characters: {seconds[1]:.3f} s vs "
                f"{seconds[0]:.3f} s ({8 * size / seconds[1] / 1e3:,.0f} kchar/s); linear time is 8x, quadratic 64x",
            }
        )
    return figures


def redaction_figures() -> list[dict]:
    return quality_figures() + growth_figures()


if __name__ == "__main__":
    for figure in redaction_figures():
        print(f"{figure['name']:36} ours {figure['ours']:8.4g}  baseline {figure['baseline']:8.4g}  {figure['detail']}")
