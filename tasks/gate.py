"""The promotion decision: absolute floors, better than base, no regression against the champion beyond a
noise-aware margin (on the eval split, and on the traffic eval split), better than the champion on the
traffic a drift retrain learnt from, and bounded quantization loss, on the metrics `gate:` in params.yaml
names. One check, one reason; all must pass."""

from __future__ import annotations

import math

from pydantic import BaseModel

from llmops.config import LOWER_IS_BETTER, GateParams
from tasks.evaluate import EvalReport, ModelScores, TrafficScores
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
    quantization_method: str = ""  # the candidate's, as the quantize stage reports it
    full_precision_layers: list[str] = []  # block layers GPTQ could not pack, left unquantized (relative names)
    traffic: str = ""  # what the traffic eval split showed, or why it was not compared

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
        if self.traffic:
            lines += ["", f"Traffic eval split: {self.traffic}"]
        if self.quantization_method == "none":
            lines += ["", "Not quantized (`quantize.method: none`): the merged model is deployed in full precision."]
        elif self.full_precision_layers:
            kept = ", ".join(f"`{name}`" for name in self.full_precision_layers)
            lines += [
                "",
                f"Layers kept in full precision in every block ({self.quantization_method} cannot pack them): {kept}",
            ]
        elif self.quantization_method:
            lines += [
                "",
                f"Layers kept in full precision: none ({self.quantization_method} quantized every block layer).",
            ]
        return "\n".join(lines)


def _floor(metric: str, value: float, bound: float) -> Check:
    """A minimum for rates, a maximum for perplexity."""
    lower = metric in LOWER_IS_BETTER
    passed = value <= bound if lower else value >= bound
    verdict = ("is within" if lower else "meets") if passed else ("is above" if lower else "is below")
    return Check(
        name=metric,
        passed=passed,
        candidate=value,
        reference=None,
        threshold=f"{'<=' if lower else '>='} {bound}",
        reason=f"{metric} {value:.3f} {verdict} the {'ceiling' if lower else 'floor'} {bound}",
    )


def _beats_base(metric: str, value: float, base: float) -> Check:
    """Strictly better than the base model. Two zeros on a rate carry no signal either way (an open-ended
    answer never matches exactly), so they pass: this check must never make promotion impossible."""
    lower = metric in LOWER_IS_BETTER
    both_zero = not lower and value == 0 and base == 0
    passed = both_zero or (value < base if lower else value > base)
    if both_zero:
        reason = f"{metric} is 0 for both the candidate and the base model: no signal, not held against it"
    else:
        reason = f"{metric} {value:.3f} {'beats' if passed else 'does not beat'} the base model's {base:.3f}"
    return Check(
        name=f"{metric} vs base",
        passed=passed,
        candidate=value,
        reference=base,
        threshold="< base" if lower else "> base",
        reason=reason,
    )


def _margin(params: GateParams, value_se: float, champion_se: float) -> float:
    """What a change of a rate must exceed to count: the larger of the fixed margin and `noise_z` standard
    errors of the difference."""
    return max(params.max_regression, params.noise_z * math.hypot(value_se, champion_se))


def _no_regression(
    name: str, value: float, value_se: float, champion: float, champion_se: float, params: GateParams
) -> Check:
    """Tolerate a drop up to the noise-aware margin."""
    margin = _margin(params, value_se, champion_se)
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


def _perplexity_vs_champion(value: float, champion: float, params: GateParams, name: str = "perplexity") -> Check:
    limit = champion * (1 + params.max_perplexity_increase)
    return Check(
        name=f"{name} vs champion",
        passed=value <= limit,
        candidate=value,
        reference=champion,
        threshold=f"<= {limit:.4f}",
        reason=f"{name} {value:.3f} vs champion {champion:.3f} "
        f"(at most {params.max_perplexity_increase:.0%} higher allowed)",
    )


def _vs_champion(
    metrics: list[str], cand: ModelScores, champ: ModelScores, params: GateParams, on: str = ""
) -> list[Check]:
    """No regression on each metric (`on`: a prefix naming the split, e.g. "traffic ")."""
    return [
        _perplexity_vs_champion(cand.perplexity, champ.perplexity, params, f"{on}perplexity")
        if metric in LOWER_IS_BETTER
        else _no_regression(f"{on}{metric}", *_metric(cand, metric), *_metric(champ, metric), params)
        for metric in metrics
    ]


def _better_on_traffic(metrics: list[str], traffic: TrafficScores, params: GateParams) -> Check:
    """A drift retrain must answer the traffic it learnt from better than the champion: beyond the margin that
    counts as noise (a rate above it by `_margin`, perplexity lower by `max_perplexity_increase`) on at least
    one metric (the table shows the first that is, or the first configured)."""
    cand, champ = traffic.candidate, traffic.champion
    gains = {}
    for metric in metrics:
        value, champion = getattr(cand, metric), getattr(champ, metric)
        if metric in LOWER_IS_BETTER:
            gains[metric] = (champion - value, champion * params.max_perplexity_increase)
        else:
            gains[metric] = (value - champion, _margin(params, _metric(cand, metric)[1], _metric(champ, metric)[1]))
    better = [m for m, (gain, margin) in gains.items() if gain > margin]
    shown = ", ".join(f"{m} {gain:+.3f} (needs > {margin:.3f})" for m, (gain, margin) in gains.items())
    shown_metric = (better or metrics)[0]
    return Check(
        name="better on traffic",
        passed=bool(better),
        candidate=getattr(cand, shown_metric),
        reference=getattr(champ, shown_metric),
        threshold=f"better beyond the margin on one of {', '.join(metrics)}",
        reason=f"on the traffic eval split ({cand.rows} rows) the candidate "
        + ("answers better than" if better else "does not answer better than")
        + f" the champion beyond the noise margin: {shown}",
    )


def _metric(scores: ModelScores, metric: str) -> tuple[float, float]:
    """A metric and its standard error over eval rows (0 where the report keeps none)."""
    return getattr(scores, metric), getattr(scores, f"{metric}_se", 0.0)


def decide(
    params: GateParams, report: EvalReport, quantization: QuantizeResult, new_traffic: bool = False
) -> GateDecision:
    """Apply the configured checks (`gate.floors`, `gate.vs_base`, `gate.vs_champion`,
    `gate.vs_champion_on_traffic`) and the bound on quantization loss; the champion checks only when there is a
    champion, the traffic ones only when the traffic eval split has rows. `new_traffic`: this run folded in
    judged traffic (a drift retrain), so it must also answer the traffic eval split better than the champion."""
    cand, base, champ = report.candidate, report.base, report.champion
    checks = [_floor(metric, getattr(cand, metric), bound) for metric, bound in params.floors.items()]
    checks += [_beats_base(metric, getattr(cand, metric), getattr(base, metric)) for metric in params.vs_base]
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
    if champ is not None:
        checks += _vs_champion(params.vs_champion, cand, champ, params)
    traffic, on_traffic = report.traffic, params.vs_champion_on_traffic
    if traffic is None:
        note = "none yet (no judged traffic held out by loop.eval_share): not compared on traffic"
    elif traffic.champion is None:
        note = f"{traffic.candidate.rows} rows; no champion to compare with"
    elif not on_traffic:
        note = f"{traffic.candidate.rows} rows; gate.vs_champion_on_traffic is empty: not compared"
    else:
        note = f"{traffic.candidate.rows} rows of `{traffic.split}`"
        checks += _vs_champion(on_traffic, traffic.candidate, traffic.champion, params, on="traffic ")
        if new_traffic:
            checks.append(_better_on_traffic(on_traffic, traffic, params))
    return GateDecision(
        passed=all(c.passed for c in checks),
        checks=checks,
        quantization_method=quantization.method,
        full_precision_layers=quantization.full_precision_layers,
        traffic=note,
    )
