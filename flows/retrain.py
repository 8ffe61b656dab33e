"""The retrain pipeline, top to bottom: validate -> finetune -> merge -> quantize -> evaluate -> gate -> promote.

Only wiring lives here: each stage is a typed function in `tasks/`, run as a Prefect task. Finetune, merge
and quantize are cached on their inputs and code, so an unchanged rerun skips them. Everything is recorded
in one MLflow run; if any stage raises, the run is marked failed and promote never runs, so the champion
stays where it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from llmops import tracking
from llmops.config import DEFAULT_PARAMS, load_params
from llmops.orchestration import stage
from tasks.evaluate import ModelScores, evaluate_task
from tasks.finetune import finetune_task
from tasks.gate import GateDecision, gate_task
from tasks.merge import merge_task
from tasks.promote import Lineage, Promotion, promote_task
from tasks.quantize import quantize_task
from tasks.validate import validate_task

fetch_champion_task = stage(tracking.download_champion)


class RetrainSummary(BaseModel):
    mlflow_run_id: str
    stages: list[tracking.StageTiming]
    candidate: ModelScores
    champion: ModelScores | None
    decision: GateDecision
    promotion: Promotion


@flow(name="retrain")
def retrain(
    params_file: str = str(DEFAULT_PARAMS), overrides: dict[str, Any] | None = None, reason: str = "manual"
) -> RetrainSummary:
    """Fine-tune the base model on the current dataset and promote the result if it passes the gate.

    Args:
        params_file: the params.yaml to run with.
        overrides: dotted keys to override for this run, e.g. {"finetune.learning_rate": 1e-3}.
        reason: why this run happened (manual, schedule, drift); recorded as lineage.
    """
    params = load_params(Path(params_file), overrides)
    flow_run_id = str(runtime.flow_run.id)
    run_dir = params.work_dir / "runs" / flow_run_id
    root = Path(params_file).resolve().parent
    tags = {"prefect_flow_run_id": flow_run_id, "reason": reason, "git_commit": tracking.git_commit(root)}

    with tracking.TrackedRun(params, run_name=runtime.flow_run.name, tags=tags) as run:
        validation = run.stage(
            "validate",
            validate_task,
            params.validate_,
            params.model.base,
            params.finetune.max_seq_len,
            params.data.train,
            params.data.eval,
            docs_dir=run_dir / "data_docs",
        )
        run.log_text(validation.to_markdown(), "data_validation.md")
        run.log_artifacts(run_dir / "data_docs", "data_docs")
        create_markdown_artifact(validation.to_markdown(), key="data-validation", description="Data validation")
        data = validation.require_valid()  # bad data stops the run here, before anything trains
        run.set_tags(data.lineage_tags())
        if data.dvc_file:
            run.log_file(data.dvc_file, "dataset.dvc")  # with it, `dvc pull` restores this exact data
        adapter = run.stage(
            "finetune",
            finetune_task,
            params.finetune,
            params.model.base,
            data,
            out=run_dir / "finetune",
            checkpoints=params.work_dir / "checkpoints",
        )
        merged = run.stage("merge", merge_task, params.merge, params.model.base, adapter, data, out=run_dir / "merge")
        deployable = run.stage("quantize", quantize_task, params.quantize, merged, data, out=run_dir / "quantize")
        champion_dir = run.stage(
            "fetch_champion",
            fetch_champion_task,
            params.tracking,
            params.registry,
            params.work_dir / "champions",
        )
        report = run.stage(
            "evaluate",
            evaluate_task,
            params.evaluate,
            deployable.model_dir,
            params.model.base,
            champion_dir,
            data,
            out=run_dir / "evaluate",
        )
        decision = run.stage("gate", gate_task, params.gate, report, deployable)
        run.log_text(decision.to_markdown(), "gate_report.md")
        create_markdown_artifact(decision.to_markdown(), key="gate-report", description="Promotion gate")
        lineage = Lineage(
            dataset_hash=data.digest,
            git_commit=tags["git_commit"],
            params_hash=params.digest(),
            prefect_flow_run_id=flow_run_id,
            mlflow_run_id=run.run_id,
            reason=reason,
        )
        promotion = run.stage(
            "promote", promote_task, params.registry, params.tracking, decision, deployable.model_dir, lineage
        )

    return RetrainSummary(
        mlflow_run_id=run.run_id,
        stages=run.timings,
        candidate=report.candidate,
        champion=report.champion,
        decision=decision,
        promotion=promotion,
    )
