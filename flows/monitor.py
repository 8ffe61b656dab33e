"""The drift check: is the incoming data still like the data the champion was trained on?

Reads a batch (the `monitor.incoming` folder, or a path given to the run), compares it with the champion's
training split as DVC recorded it, and publishes the report (a Prefect table and markdown, an MLflow run in
the `<experiment>-monitor` experiment with a plot). On drift it emits the Prefect event
`llmops.drift.detected`; the automation registered by `llmops deploy` answers with a retrain that folds the
batch in. This flow never trains and never touches the registry.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from llmops import tracking
from llmops.config import DEFAULT_PARAMS, load_params
from llmops.data import batch_files
from llmops.errors import LLMOpsError
from llmops.orchestration import stage
from tasks.drift import DriftReport, champion_reference, detect_drift

DRIFT_EVENT = "llmops.drift.detected"
drift_task = stage(detect_drift)


def dataset_resource(model_name: str) -> str:
    """The event's resource id: the incoming data of one registered model (automations match on it)."""
    return f"llmops.dataset.{model_name}"


@flow(name="monitor")
def monitor(params_file: str = str(DEFAULT_PARAMS), incoming: str | None = None) -> DriftReport | None:
    """Check an incoming batch for drift against the champion's training data; emit an event on drift.

    Args:
        params_file: The params.yaml to run with (thresholds are in its `monitor:` section).
        incoming: A JSONL file or a folder of them; default: the params' monitor.incoming folder.
    """
    logger = get_run_logger()
    params = load_params(Path(params_file))
    batch = Path(incoming) if incoming else params.monitor.incoming
    files = batch_files(batch) if batch.exists() or incoming else []
    if not files:
        logger.info("No incoming data in %s: nothing to check.", batch)
        return None
    champion = tracking.champion_version(params.tracking, params.registry)
    if champion is None:
        raise LLMOpsError(
            f"No champion for {params.registry.model_name!r} yet, so there is nothing to compare incoming data "
            "against. Run `llmops run` first."
        )
    lineage = tracking.describe_version(params.tracking, params.registry, champion.version)
    reference = champion_reference(lineage["dataset"], lineage["dataset_record"])
    champion_dir = tracking.download_champion(params.tracking, params.registry, params.work_dir / "champions")
    run_dir = params.work_dir / "monitor" / str(runtime.flow_run.id)
    tags = {"prefect_flow_run_id": str(runtime.flow_run.id), "champion_version": champion.version}
    experiment = f"{params.tracking.experiment}-monitor"

    with tracking.TrackedRun(params, runtime.flow_run.name, tags, experiment=experiment) as run:
        report = run.stage(
            "drift",
            drift_task,
            params.monitor,
            reference,
            files,
            champion_dir,
            out=run_dir,
            device=params.model.device,
            dtype=params.model.dtype,
        )
        run.log_text(report.to_markdown(), "drift_report.md")
        run.log_artifacts(run_dir, "drift")
        run.set_tags({"drifted": str(report.drifted).lower()})

    create_markdown_artifact(report.to_markdown(), key="drift-report", description="Drift check")
    create_table_artifact(
        [c.model_dump() for c in report.checks], key="drift-scores", description=f"Drift: {report.verdict}"
    )
    logger.info("Drift check of %s: %s %s", batch, report.verdict, report.scores())
    if report.drifted:
        emit_event(
            DRIFT_EVENT,
            resource={"prefect.resource.id": dataset_resource(params.registry.model_name), "batch": str(batch)},
            payload={
                "incoming": str(batch.resolve()),
                "params_file": str(Path(params_file).resolve()),
                "champion_version": champion.version,
                "scores": report.scores(),
                "mlflow_run_id": run.run_id,
            },
        )
    return report
