"""The baseline for the orchestration-overhead benchmark: the retrain pipeline's stage functions called one
after the other in a plain script: no Prefect, no caching, no per-stage MLflow logging, no artifacts.

Usage: python bench/plain_pipeline.py PARAMS_FILE
"""

import sys
from pathlib import Path

from mlflow import MlflowClient

from llmops import tracking
from llmops.config import load_params
from tasks.evaluate import evaluate_models
from tasks.finetune import finetune
from tasks.gate import decide
from tasks.merge import merge_adapter
from tasks.promote import Lineage, promote
from tasks.quantize import quantize_model
from tasks.validate import validate_dataset

params = load_params(Path(sys.argv[1]))
out = params.work_dir / "plain"
data = validate_dataset(
    params.validate_,
    params.model.base,
    params.finetune.max_seq_len,
    params.data.train,
    params.data.eval,
    out=out / "validate",
    excess_length=params.data.excess_length,
    chat_template=params.data.chat_template,
).require_valid()
adapter = finetune(params.finetune, params.model.base, data, out / "finetune", params.work_dir / "checkpoints")
merged = merge_adapter(params.merge, params.model.base, adapter, data, out / "merge")
deployable = quantize_model(params.quantize, merged, data, out / "quantize")
champion = tracking.download_champion(params.tracking, params.registry, params.work_dir / "champions")
report = evaluate_models(params.evaluate, deployable.model_dir, params.model.base, champion, data, out / "evaluate")
decision = decide(params.gate, report, deployable)
client: MlflowClient = tracking.client_for(params.tracking)
experiment = client.get_experiment_by_name("plain") or client.get_experiment(
    client.create_experiment("plain", artifact_location=params.tracking.artifact_location)
)
run_id = client.create_run(experiment.experiment_id).info.run_id  # the registry needs a run to hold the model
lineage = Lineage(
    dataset_hash=data.digest,
    git_commit="bench",
    params_hash=params.digest(),
    prefect_flow_run_id="none",
    mlflow_run_id=run_id,
    reason="bench",
)
print(promote(params.registry, params.tracking, decision, deployable.model_dir, lineage))
