"""The promotion decision: absolute floors, better than base, no regression against the champion beyond a
noise-aware margin, and bounded quantization loss. One check, one reason; all must pass."""

from __future__ import annotations

import math

from pydantic import BaseModel

from llmops.config import GateParams
from tasks.evaluate import EvalReport
from tasks.quantize import QuantizeResult


class Check(BaseModel, frozen=True):
    name: str
    passed: bool
    candidate: float
    reference: float | None  # the champion's or base's value where the check compares, else None
    threshold: str
    reason: str


class GateDecision(BaseModel, frozen=True):
    passed: bool
    checks: list[Check]

    @property
    def reasons(self) -> list[str]:
        return [check.reason for check in self.checks if not check.passed] or ["all checks passed"]

    def to_markdown(self) -> str:
        verdict = "PASSED: candidate becomes `champion`" if self.passed else "REJECTED: recorded as `challenger`"
        lines = [
            f"## Gate {verdict}",
            "",
            "| check | candidate | reference | threshold | result |",
            "|---|---|---|---|---|",
        ]
        for c in self.checks:
            reference = "" if c.reference is None else f"{c.reference:.4f}"
            lines.append(
                f"| {c.name} | {c.candidate:.4f} | {reference} | {c.threshold} | {'pass' if c.passed else 'FAIL'} |"
            )
        lines += ["", *[f"- {c.reason}" for c in self.checks]]
        return "\n".join(lines)


def _floor(name: str, value: float, minimum: float) -> Check:
    passed = value >= minimum
    verdict = "meets" if passed else "is below"
    return Check(
        name=name,
        passed=passed,
        candidate=value,
        reference=None,
        threshold=f">= {minimum}",
        reason=f"{name} {value:.3f} {verdict} the floor {minimum}",
    )


def _no_regression(
    name: str, value: float, value_se: float, champion: float, champion_se: float, params: GateParams
) -> Check:
    """Tolerate a drop up to the larger of the fixed margin and `noise_z` standard errors of the difference."""
    margin = max(params.max_regression, params.noise_z * math.hypot(value_se, champion_se))
    passed = value >= champion - margin
    verdict = "within" if passed else "beyond"
    return Check(
        name=f"{name} vs champion",
        passed=passed,
        candidate=value,
        reference=champion,
        threshold=f">= champion - {margin:.3f}",
        reason=f"{name} {value:.3f} vs champion {champion:.3f}: change {value - champion:+.3f} is "
        f"{verdict} the noise-aware margin {margin:.3f}",
    )


def decide(params: GateParams, report: EvalReport, quantization: QuantizeResult) -> GateDecision:
    cand, base, champ = report.candidate, report.base, report.champion
    checks = [
        _floor("exact_match", cand.exact_match, params.min_exact_match),
        _floor("rouge_l", cand.rouge_l, params.min_rouge_l),
        _floor("eos_rate", cand.eos_rate, params.min_eos_rate),
    ]
    if params.require_better_than_base:
        better = cand.exact_match > base.exact_match
        checks.append(
            Check(
                name="exact_match vs base",
                passed=better,
                candidate=cand.exact_match,
                reference=base.exact_match,
                threshold="> base",
                reason=f"exact_match {cand.exact_match:.3f} {'beats' if better else 'does not beat'} the base "
                f"model's {base.exact_match:.3f}",
            )
        )
    ratio = quantization.perplexity_ratio
    checks.append(
        Check(
            name="quantization ppl ratio",
            passed=ratio <= params.max_quantization_ppl_ratio,
            candidate=ratio,
            reference=None,
            threshold=f"<= {params.max_quantization_ppl_ratio}",
            reason=f"{quantization.method} perplexity is {ratio:.3f}x the merged model's "
            f"(limit {params.max_quantization_ppl_ratio}x)",
        )
    )
    if champ is None:
        return GateDecision(passed=all(c.passed for c in checks), checks=checks)
    checks += [
        _no_regression(
            "exact_match",
            cand.exact_match,
            cand.exact_match_se,
            champ.exact_match,
            champ.exact_match_se,
            params,
        ),
        _no_regression("rouge_l", cand.rouge_l, cand.rouge_l_se, champ.rouge_l, champ.rouge_l_se, params),
    ]
    limit = champ.perplexity * (1 + params.max_perplexity_increase)
    checks.append(
        Check(
            name="perplexity vs champion",
            passed=cand.perplexity <= limit,
            candidate=cand.perplexity,
            reference=champ.perplexity,
            threshold=f"<= {limit:.4f}",
            reason=f"perplexity {cand.perplexity:.3f} vs champion {champ.perplexity:.3f} "
            f"(at most {params.max_perplexity_increase:.0%} higher allowed)",
        )
    )
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)
