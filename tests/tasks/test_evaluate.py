import json

import pytest
import torch

from llmops.config import EvaluateParams, ValidateParams
from llmops.data import Conversation
from llmops.modeling import load_model, load_tokenizer
from tasks.evaluate import evaluate_models, score_model
from tasks.validate import validate_dataset

QUESTIONS = [
    "What color is the tiger?",
    "What kind of thing is the apple?",
    "Tell me the color of the kettle.",
    "Name the category of the canoe.",
    "Classify the velvet.",
    "Which color does the harbor have?",
]


def test_scores_follow_the_generations(assets):
    # The base model knows the facts but not the format, so it rambles: asking it to reproduce its own
    # greedy output must score perfectly. (Where it stops at once there are no words to score: skipped.)
    model, params = assets / "model", EvaluateParams(max_new_tokens=6)
    placeholders = [Conversation.from_pair(q, "placeholder") for q in QUESTIONS]
    samples = score_model(params, model, placeholders).samples
    own = [Conversation.from_pair(s.prompt, s.generated) for s in samples if s.generated]
    assert own, "the base model answered none of the questions with any words"
    perfect = score_model(params, model, own)
    assert perfect.exact_match == 1.0 and perfect.rouge_l == pytest.approx(1.0) and perfect.bleu > 0.99
    wrong = score_model(params, model, [Conversation.from_pair(e.last_user, "zebra") for e in own])
    assert wrong.exact_match == 0.0 and wrong.rouge_l == 0.0
    assert wrong.perplexity > perfect.perplexity


def test_report_covers_candidate_base_and_champion(assets, tmp_path):
    data = validate_dataset(
        ValidateParams(), str(assets / "model"), 1024, assets / "data" / "train", assets / "data" / "eval"
    ).require_valid()
    # A candidate that differs from the base in a known way: its output layer zeroed, so every next token is
    # equally likely and its perplexity is exactly the vocabulary size, whatever the base scores.
    uniform = load_model(assets / "model")
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    uniform.save_pretrained(tmp_path / "uniform")
    load_tokenizer(assets / "model").save_pretrained(tmp_path / "uniform")

    params = EvaluateParams(max_samples=8, max_new_tokens=4)
    report = evaluate_models(
        params, tmp_path / "uniform", str(assets / "model"), assets / "model", data, tmp_path / "eval"
    )
    assert report.candidate.rows == 8 and report.candidate.model == str(tmp_path / "uniform")
    assert report.candidate.perplexity == pytest.approx(uniform.config.vocab_size, rel=1e-4)
    assert report.base.perplexity != pytest.approx(report.candidate.perplexity, rel=1e-2)
    assert report.candidate.eos_rate == 0.0  # every logit ties: greedy takes the first id, never EOS
    assert report.champion.perplexity == pytest.approx(report.base.perplexity)  # the champion is the base here
    saved = json.loads(report.report_file.read_text())
    assert saved["candidate"]["perplexity"] == report.candidate.perplexity
    assert saved["champion"]["model"] == str(assets / "model")
