from pathlib import Path

import pytest

from llmops.config import GateParams, load_params
from tasks.evaluate import EvalReport, ModelScores, TrafficScores
from tasks.gate import decide
from tasks.quantize import QuantizeResult

QUANT = QuantizeResult(
    model_dir=Path("q"),
    method="gptq",
    size_bytes=1,
    merged_size_bytes=4,
    perplexity=1.2,
    merged_perplexity=1.2,
)


def scores(em=0.9, rouge=0.9, eos=1.0, ppl=1.2, se=0.03) -> ModelScores:
    return ModelScores(
        model="m",
        perplexity=ppl,
        exact_match=em,
        exact_match_se=se,
        rouge_l=rouge,
        rouge_l_se=se,
        bleu=em,
        eos_rate=eos,
        rows=100,
        samples=[],
    )


def report(candidate=None, champion=None, base=None, traffic=None) -> EvalReport:
    return EvalReport(
        candidate=candidate or scores(),
        base=base or scores(em=0.0, rouge=0.1, ppl=30),
        champion=champion,
        report_file=Path("r.json"),
        traffic=traffic,
    )


def failed(decision) -> set[str]:
    return {check.name for check in decision.checks if not check.passed}


# The shipped params.yaml is the demo's: short fixed answers, so it keeps exact-match checks.
DEMO = load_params(Path(__file__).resolve().parents[2] / "params.yaml").gate


def test_first_candidate_is_judged_by_absolute_checks_alone():
    for params in (GateParams(), DEMO):
        decision = decide(params, report(), QUANT)
        assert decision.passed and decision.reasons == ["all checks passed"]
        assert not any("champion" in check.name for check in decision.checks)


@pytest.mark.parametrize(
    ("candidate", "failing"),
    [
        (scores(em=0.1), {"exact_match"}),
        (scores(rouge=0.2), {"rouge_l"}),
        (scores(eos=0.5), {"eos_rate"}),
    ],
)
def test_each_floor_rejects(candidate, failing):
    decision = decide(DEMO, report(candidate=candidate), QUANT)
    assert not decision.passed and failed(decision) == failing


def test_perplexity_floor_is_a_ceiling():
    params = GateParams(floors={"perplexity": 1.3})
    assert decide(params, report(candidate=scores(ppl=1.25)), QUANT).passed
    decision = decide(params, report(candidate=scores(ppl=1.35)), QUANT)
    assert failed(decision) == {"perplexity"} and "above the ceiling 1.3" in decision.reasons[0]


def test_candidate_must_beat_the_base_on_the_configured_metrics():
    same = report(candidate=scores(em=0.5), base=scores(em=0.5))
    assert failed(decide(DEMO, same, QUANT)) == {"exact_match vs base"}
    assert decide(DEMO.model_copy(update={"vs_base": []}), same, QUANT).passed
    # The defaults compare perplexity (lower wins) and ROUGE-L with the base.
    worse = report(candidate=scores(ppl=31, rouge=0.05), base=scores(ppl=30, rouge=0.1))
    assert failed(decide(GateParams(), worse, QUANT)) == {"perplexity vs base", "rouge_l vs base"}


def test_open_ended_answers_scoring_zero_everywhere_can_still_be_promoted():
    # Chat data: no answer ever matches exactly, for the base or the candidate. That must not block.
    chat = report(candidate=scores(em=0.0, rouge=0.4, ppl=5.0), base=scores(em=0.0, rouge=0.2, ppl=9.0))
    assert decide(GateParams(), chat, QUANT).passed
    decision = decide(GateParams(vs_base=["exact_match", "perplexity"]), chat, QUANT)
    assert decision.passed
    [check] = [c for c in decision.checks if c.name == "exact_match vs base"]
    assert "no signal" in check.reason
    # A zero that is a real loss against a base that scored is still a failure.
    lost = report(candidate=scores(em=0.0), base=scores(em=0.2, rouge=0.1, ppl=30))
    assert failed(decide(GateParams(vs_base=["exact_match"]), lost, QUANT)) == {"exact_match vs base"}


def test_gate_params_reject_impossible_bounds():
    with pytest.raises(ValueError, match="rate and must be between 0 and 1"):
        GateParams(floors={"rouge_l": 1.5})
    with pytest.raises(ValueError, match="maximum perplexity"):
        GateParams(floors={"perplexity": 0.5})
    with pytest.raises(ValueError):
        GateParams(vs_base=["accuracy"])


def test_quantization_loss_is_bounded():
    lossy = QUANT.model_copy(update={"perplexity": 1.5})
    assert failed(decide(GateParams(), report(), lossy)) == {"quantization ppl ratio"}


def test_a_drop_within_noise_passes_and_beyond_it_fails():
    champion = scores(em=0.9, rouge=0.9, se=0.03)
    # margin = max(0.02, 2 * hypot(0.03, 0.03)) = 0.085
    assert decide(DEMO, report(candidate=scores(em=0.83, rouge=0.83), champion=champion), QUANT).passed
    decision = decide(DEMO, report(candidate=scores(em=0.80, rouge=0.9), champion=champion), QUANT)
    assert failed(decision) == {"exact_match vs champion"}
    # With no noise the fixed margin alone applies.
    exact = scores(em=0.9, se=0.0)
    decision = decide(DEMO, report(candidate=scores(em=0.87, se=0.0), champion=exact), QUANT)
    assert failed(decision) == {"exact_match vs champion"}
    # The defaults leave exact match out of it: ROUGE-L and perplexity decide.
    assert decide(GateParams(), report(candidate=scores(em=0.5), champion=champion), QUANT).passed
    decision = decide(GateParams(), report(candidate=scores(rouge=0.7), champion=champion), QUANT)
    assert failed(decision) == {"rouge_l vs champion"}


def test_perplexity_regression_against_champion_fails():
    decision = decide(GateParams(), report(candidate=scores(ppl=1.4), champion=scores(ppl=1.2)), QUANT)
    assert failed(decision) == {"perplexity vs champion"}
    assert "perplexity 1.400 vs champion 1.200" in " ".join(decision.reasons)


def test_markdown_lists_every_check():
    decision = decide(DEMO, report(candidate=scores(em=0.1), champion=scores()), QUANT)
    text = decision.to_markdown()
    assert text.startswith("## Gate REJECTED")
    assert all(check.name in text for check in decision.checks)


def test_markdown_names_the_layers_left_in_full_precision():
    kept = QUANT.model_copy(update={"full_precision_layers": ["self_attn.k_proj", "self_attn.v_proj"]})
    decision = decide(GateParams(), report(), kept)
    assert decision.full_precision_layers == ["self_attn.k_proj", "self_attn.v_proj"]
    assert "full precision in every block (gptq cannot pack them): `self_attn.k_proj`, `self_attn.v_proj`" in (
        decision.to_markdown()
    )
    assert "Layers kept in full precision: none" in decide(GateParams(), report(), QUANT).to_markdown()
    unquantized = QUANT.model_copy(update={"method": "none"})
    assert "the merged model is deployed in full precision" in decide(GateParams(), report(), unquantized).to_markdown()


def on_traffic(candidate: ModelScores, champion: ModelScores) -> TrafficScores:
    return TrafficScores(split=Path("data/demo/traffic-eval.jsonl"), candidate=candidate, champion=champion)


def test_a_drift_retrain_is_promoted_only_when_it_answers_the_held_out_traffic_better():
    champion = scores()
    better = on_traffic(scores(rouge=0.9, ppl=2.0), scores(rouge=0.5, ppl=4.0))  # corrections learnt
    same = on_traffic(scores(rouge=0.52, ppl=3.9), scores(rouge=0.5, ppl=4.0))  # within noise: learnt nothing
    promoted = decide(GateParams(), report(champion=champion, traffic=better), QUANT, new_traffic=True)
    assert promoted.passed and "better on traffic" in {c.name for c in promoted.checks}
    rejected = decide(GateParams(), report(champion=champion, traffic=same), QUANT, new_traffic=True)
    assert failed(rejected) == {"better on traffic"}
    assert "does not answer better than the champion" in " ".join(rejected.reasons)
    # A run that learnt from no new traffic (a scheduled retrain) must only not regress on it.
    scheduled = decide(GateParams(), report(champion=champion, traffic=same), QUANT)
    assert scheduled.passed and {"traffic perplexity vs champion", "traffic rouge_l vs champion"} <= {
        c.name for c in scheduled.checks
    }


def test_a_regression_on_the_held_out_traffic_rejects_and_the_report_shows_the_split():
    worse = on_traffic(scores(rouge=0.3, ppl=6.0), scores(rouge=0.9, ppl=2.0))
    decision = decide(GateParams(), report(champion=scores(), traffic=worse), QUANT)
    assert failed(decision) == {"traffic perplexity vs champion", "traffic rouge_l vs champion"}
    assert "Traffic eval split: 100 rows of `data/demo/traffic-eval.jsonl`" in decision.to_markdown()
    unchecked = decide(GateParams(vs_champion_on_traffic=[]), report(champion=scores(), traffic=worse), QUANT)
    assert unchecked.passed and "not compared" in unchecked.to_markdown()
    none_yet = decide(GateParams(), report(champion=scores()), QUANT, new_traffic=True)
    assert none_yet.passed and "none yet" in none_yet.to_markdown()
