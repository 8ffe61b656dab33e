"""Score the deployable candidate, the base model and the current champion on the held-out eval split, and
the candidate and the champion on the traffic eval split (judged traffic held out by `loop.eval_share`).

In every eval conversation the last assistant turn is the reference and everything before it the prompt.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from pydantic import BaseModel

from llmops.config import EvaluateParams, dvc_stage_args
from llmops.data import Conversation, DatasetRef, read_conversations
from llmops.devices import DeviceChoice, DtypeChoice, Placement, resolve_placement
from llmops.files import atomic_dir, load_result, save_result, write_json, write_stage_metadata
from llmops.modeling import EVAL_MAX_SEQ_LEN, generate, load_model, load_tokenizer, response_perplexity
from tasks.quantize import QuantizeResult

log = logging.getLogger(__name__)
SAMPLES_KEPT = 5


class Sample(BaseModel, frozen=True):
    prompt: str  # the last user turn (the model saw the whole conversation before it)
    expected: str
    generated: str


class ModelScores(BaseModel, frozen=True):
    """Metrics of one model; `*_se` are standard errors over eval rows, used by the gate's noise margin."""

    model: str
    perplexity: float
    exact_match: float
    exact_match_se: float
    rouge_l: float
    rouge_l_se: float
    bleu: float
    eos_rate: float
    rows: int
    samples: list[Sample]


class TrafficScores(BaseModel, frozen=True):
    """The candidate and the champion on the traffic eval split: how each answers what users asked lately."""

    split: Path
    candidate: ModelScores
    champion: ModelScores | None


class EvalReport(BaseModel, frozen=True):
    candidate: ModelScores
    base: ModelScores
    champion: ModelScores | None
    report_file: Path
    traffic: TrafficScores | None = None  # when the dataset has a traffic eval split with rows


def _standard_error(values: list[float]) -> float:
    return statistics.pstdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def score_model(
    params: EvaluateParams,
    model_path: str | Path,
    examples: list[Conversation],
    chat_template: str | None = None,
    placement: Placement | None = None,
) -> ModelScores:
    """Perplexity of the assistant turns, then greedy generations of the last one scored against it, on
    `placement` (the device policy; `auto` if not given). `chat_template` replaces the model's own
    (data.chat_template, for the base model)."""
    import sacrebleu  # here, not above: with rouge_score (nltk, scikit-learn), imports a cached run never needs
    from rouge_score import rouge_scorer

    placement = placement or resolve_placement()
    tokenizer = load_tokenizer(model_path, chat_template)
    model = load_model(model_path, dtype=placement.dtype, device=placement.device)
    perplexity = response_perplexity(model, tokenizer, examples, EVAL_MAX_SEQ_LEN)
    generations = generate(model, tokenizer, [e.prompt for e in examples], params.max_new_tokens)
    texts = [g.text for g in generations]
    references = [e.reference.strip() for e in examples]
    matches = [float(" ".join(t.split()) == " ".join(r.split())) for t, r in zip(texts, references, strict=True)]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, t)["rougeL"].fmeasure for t, r in zip(texts, references, strict=True)]
    return ModelScores(
        model=str(model_path),
        perplexity=perplexity,
        exact_match=statistics.fmean(matches),
        exact_match_se=_standard_error(matches),
        rouge_l=statistics.fmean(rouge),
        rouge_l_se=_standard_error(rouge),
        # Sentence BLEU with effective n-gram order, averaged: corpus BLEU is 0 for answers under 4 words.
        bleu=statistics.fmean(
            sacrebleu.sentence_bleu(t, [r], smooth_method="exp").score / 100
            for t, r in zip(texts, references, strict=True)
        ),
        eos_rate=statistics.fmean(float(g.stopped_at_eos) for g in generations),
        rows=len(examples),
        samples=[
            Sample(prompt=e.last_user, expected=e.reference, generated=t)
            for e, t in list(zip(examples, texts, strict=True))[:SAMPLES_KEPT]
        ],
    )


def evaluate_models(
    params: EvaluateParams,
    candidate: Path,
    base_model: str,
    champion: Path | None,
    data: DatasetRef,
    out: Path,
    device: DeviceChoice = "auto",
    dtype: DtypeChoice = "auto",
    traffic_eval: Path | None = None,
) -> EvalReport:
    """Score each model on the same eval rows, and the candidate and the champion on the rows of
    `traffic_eval` (the traffic eval split, when there is one), on the device policy's device and type, and
    write the JSON report to `out`."""
    examples = read_conversations(data.eval)[: params.max_samples]
    served = read_conversations(traffic_eval)[: params.max_samples] if traffic_eval else []
    placement = resolve_placement(device, dtype)
    log.info("evaluating on %s", placement)
    scores = {
        "candidate": score_model(params, candidate, examples, placement=placement),
        "base": score_model(params, base_model, examples, data.chat_template, placement),
        "champion": score_model(params, champion, examples, placement=placement) if champion else None,
    }
    traffic = None
    if served:
        traffic = TrafficScores(
            split=traffic_eval,
            candidate=score_model(params, candidate, served, placement=placement),
            champion=score_model(params, champion, served, placement=placement) if champion else None,
        )
    shown = dict(scores)
    if traffic:
        shown |= {"candidate on traffic": traffic.candidate, "champion on traffic": traffic.champion}
    for name, m in shown.items():
        if m:
            log.info("%s: exact match %.3f, ROUGE-L %.3f, ppl %.3f", name, m.exact_match, m.rouge_l, m.perplexity)
    report = {k: v.model_dump(mode="json") if v else None for k, v in scores.items()}
    report["traffic"] = traffic.model_dump(mode="json") if traffic else None
    with atomic_dir(out) as tmp:
        write_json(tmp / "eval_report.json", report)
        write_stage_metadata(tmp, "evaluate", params, dataset=data.model_dump(mode="json"))
    return EvalReport(**scores, report_file=out / "eval_report.json", traffic=traffic)


def main() -> None:
    """DVC stage `evaluate`: the candidate against the base (the champion lives in the registry, not here)."""
    params, out = dvc_stage_args("evaluate")
    data = load_result(DatasetRef, out.with_name("validate"))
    candidate = load_result(QuantizeResult, out.with_name("quantize")).model_dir
    model = params.model
    report = evaluate_models(params.evaluate, candidate, model.base, None, data, out, model.device, model.dtype)
    save_result(report, out)


if __name__ == "__main__":
    main()
