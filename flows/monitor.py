"""The drift check: is the incoming data still like the data the champion was trained on?

Reads what came in (the `monitor.incoming` folder, or a path given to the run): a batch of conversation
files, and the traffic log `llmops serve` writes under it, of which it checks the prompts the champion was
served. Each is compared with the champion's training split as DVC recorded it, and the reports are published
(Prefect tables and markdown, an MLflow run in the `<experiment>-monitor` experiment with plots). On drift it
emits the Prefect event `llmops.drift.detected`; the automation registered by `llmops deploy` answers with a
retrain that folds the folder in: the batch, and the traffic users judged. This flow never trains and never
touches the registry.
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
from llmops.serving.traffic_log import served_prompts, traffic_log
from tasks.drift import (
    DriftReport,
    already_fired,
    champion_reference,
    detect_drift,
    detect_traffic_drift,
    drift_fingerprint,
    remember_fired,
    traffic_window,
)

DRIFT_EVENT = "llmops.drift.detected"
drift_task = stage(detect_drift)
traffic_drift_task = stage(detect_traffic_drift)


def dataset_resource(model_name: str) -> str:
    """The event's resource id: the incoming data of one registered model (automations match on it)."""
    return f"llmops.dataset.{model_name}"


@flow(name="monitor")
def monitor(params_file: str = str(DEFAULT_PARAMS), incoming: str | None = None) -> list[DriftReport]:
    """Check incoming data for drift against the champion's training data; emit an event on drift.

    Args:
        params_file: The params.yaml to run with (thresholds are in its `monitor:` section).
        incoming: A JSONL file or a folder of them, with or without a traffic log; default: the params'
            monitor.incoming folder.

    Returns:
        A report per kind of data found (the batch, the served prompts); none when nothing came in.
    """
    logger = get_run_logger()
    params = load_params(Path(params_file))
    folder = Path(incoming) if incoming else params.monitor.incoming
    batch = batch_files(folder) if folder.exists() or incoming else []
    traffic = traffic_log(folder) if folder.is_dir() else None
    log_folder = traffic  # the whole log: its judgments mark what a retrain could learn from
    if not batch and traffic is None:
        logger.info("No incoming data in %s: nothing to check.", folder)
        return []
    champion = tracking.champion_version(params.tracking, params.registry)
    if champion is None:
        raise LLMOpsError(
            f"No champion for {params.registry.model_name!r} yet, so there is nothing to compare incoming data "
            "against. Run `llmops run` first."
        )
    version = str(champion.version)  # MLflow gives an int; the log and the lineage reader name versions as text
    if traffic is not None and not served_prompts(traffic, version, since=traffic_window(params.monitor)):
        logger.info(
            "The traffic log %s holds nothing the champion (version %s) served in the last %s hours.",
            traffic,
            version,
            params.monitor.window_hours,
        )
        traffic = None
        if not batch:
            return []
    lineage = tracking.describe_version(params.tracking, params.registry, version)
    reference = champion_reference(lineage["dataset"], lineage["dataset_record"])
    champion_dir = tracking.download_champion(params.tracking, params.registry, params.work_dir / "champions")
    run_dir = params.work_dir / "monitor" / str(runtime.flow_run.id)
    tags = {"prefect_flow_run_id": str(runtime.flow_run.id), "champion_version": version}
    experiment = f"{params.tracking.experiment}-monitor"
    placement = {"device": params.model.device, "dtype": params.model.dtype}

    reports: list[DriftReport] = []
    with tracking.TrackedRun(params, runtime.flow_run.name, tags, experiment=experiment) as run:
        if batch:
            reports.append(
                run.stage(
                    "drift",
                    drift_task,
                    params.monitor,
                    reference,
                    batch,
                    champion_dir,
                    out=run_dir / "batch",
                    **placement,
                )
            )
        if traffic is not None:
            reports.append(
                run.stage(
                    "traffic_drift",
                    traffic_drift_task,
                    params.monitor,
                    reference,
                    traffic,
                    version,
                    champion_dir,
                    out=run_dir / "traffic",
                    **placement,
                )
            )
        run.log_text("\n\n".join(r.to_markdown() for r in reports), "drift_report.md")
        run.log_artifacts(run_dir, "drift")
        drifted = [r for r in reports if r.drifted]
        # No retrain storm: an event already fired for this champion, batch and judged traffic is not fired
        # again (its retrain promoted, which moved the champion, or was rejected and would be again).
        fingerprint = drift_fingerprint(version, batch, log_folder)
        fired_record = params.work_dir / "monitor" / f"fired-{params.registry.model_name}.json"
        held_back = bool(drifted) and already_fired(fired_record, fingerprint)
        event = "held_back" if held_back else "emitted" if drifted else "none"
        run.set_tags({"drifted": str(bool(drifted)).lower(), "drift_event": event})

    for report in reports:
        key = "drift" if report.view == "conversations" else "traffic-drift"
        create_markdown_artifact(report.to_markdown(), key=f"{key}-report", description="Drift check")
        create_table_artifact(
            [c.model_dump() for c in report.checks], key=f"{key}-scores", description=f"Drift: {report.verdict}"
        )
        logger.info("Drift check of %s: %s %s", report.source, report.verdict, report.scores())
    if held_back:
        logger.info(
            "Drift again, but an event was already fired for champion %s with this batch and judged traffic (%s); "
            "held back until new judged traffic arrives or the champion changes.",
            version,
            fingerprint,
        )
    elif drifted:
        remember_fired(fired_record, fingerprint)
        emit_event(
            DRIFT_EVENT,
            resource={"prefect.resource.id": dataset_resource(params.registry.model_name), "batch": str(folder)},
            payload={
                "incoming": str(folder.resolve()),
                "params_file": str(Path(params_file).resolve()),
                "champion_version": version,
                "drifted": [r.view for r in drifted],
                "scores": {r.view: r.scores() for r in drifted},
                "mlflow_run_id": run.run_id,
            },
        )
    return reports
