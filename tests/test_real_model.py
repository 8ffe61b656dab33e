"""The whole flow on real pretrained weights: SmolLM2-135M-Instruct, built by `make real-model` (which `make test`
runs first). Sized for CI: a few chat rows, one epoch, a small GPTQ calibration, four eval rows."""

import mlflow
import pytest

from llmops import tracking
from llmops.config import load_params
from llmops.data import read_conversations, write_jsonl
from tests.conftest import PROJECT, write_params

REAL_MODEL = PROJECT / "models" / "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_MODEL / "config.json").exists(), reason="run `make real-model` (make test does)")
@pytest.mark.usefixtures("prefect_harness")
def test_real_model_runs_end_to_end_and_still_answers_a_factual_question(assets, tmp_path):
    from flows.retrain import retrain

    write_jsonl(tmp_path / "train.jsonl", read_conversations(assets / "data" / "train")[:16])
    write_jsonl(tmp_path / "eval.jsonl", read_conversations(assets / "data" / "eval")[:10])
    params_file = write_params(
        tmp_path,
        assets,
        model__base=str(REAL_MODEL),
        data__train=str(tmp_path / "train.jsonl"),
        data__eval=str(tmp_path / "eval.jsonl"),
        finetune__epochs=1,
        quantize__calibration_samples=16,
        evaluate__max_samples=4,
    )
    summary = retrain(params_file=str(params_file), reason="test")
    assert summary.stages[-1].name == "promote"  # every stage ran; the gate may keep it a challenger

    params = load_params(params_file)
    tracking.client_for(params.tracking)
    version = f"models:/{params.registry.model_name}/{summary.promotion.version}"
    [answer] = mlflow.pyfunc.load_model(version).predict([{"prompt": "What is the capital of France?"}])
    assert "Paris" in answer, answer
    for debris in ("<|im_start|>", "<|im_end|>", "### ", "assistant\n", "<|endoftext|>"):
        assert debris not in answer, answer
