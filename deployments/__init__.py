"""The Prefect deployments of this project and the automation that links drift to retraining.

`register()` creates (or updates) them on whichever Prefect API the environment points at: the local
platform (`make platform`) or a team's server (`PREFECT_API_URL=... llmops deploy`).

- `retrain`: the retrain flow, on the `deploy.retrain_cron` schedule, one run at a time (a second run
  waits), so two runs can never promote at once. Its parameters are typed and described, so the Prefect
  UI's "Custom run" form shows them: dataset, incoming batch, learning rate, epochs, overrides, reason.
- `monitor`: the drift check of `monitor.incoming`, on the `deploy.monitor_cron` schedule.
- `retrain-on-drift`: an automation on the retrain deployment. A `llmops.drift.detected` event for this
  project's model runs `retrain` with reason `drift` and the drifted batch as `incoming`. It is reactive
  with a threshold of one event in a window of `deploy.drift_cooldown_minutes`: Prefect fires on the first
  event and ignores the rest of the window, so a storm of events starts one retrain.
- `<model>-crashed-when-silent`: a flow run of these deployments sends a heartbeat every
  `deploy.heartbeat_seconds`; one that falls silent for `deploy.crashed_after_seconds` (its host died, its
  worker was killed) is marked Crashed, which frees the deployment's slot. Retry it (the UI's Retry, or
  `prefect flow-run retry <id>`) and any worker resumes it: finetune from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from uuid import UUID

from prefect import flow
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.exceptions import ObjectAlreadyExists
from prefect.schedules import Cron, Schedule

from flows.monitor import DRIFT_EVENT, dataset_resource
from llmops.config import Params, load_params

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where the flow code lives; process workers run from here


@dataclass(frozen=True)
class Registered:
    work_pool: str
    retrain: UUID
    monitor: UUID


def drift_trigger(params: Params, params_file: Path) -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        name="retrain-on-drift",
        description="Retrain on the drifted batch when the monitor reports drift; one retrain per cooldown.",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": dataset_resource(params.registry.model_name)},
        posture="Reactive",
        threshold=1,
        within=timedelta(minutes=params.deploy.drift_cooldown_minutes),
        parameters={"params_file": str(params_file), "reason": "drift", "incoming": "{{ event.payload.incoming }}"},
    )


def register(params_file: Path) -> Registered:
    """Create the work pool if needed, then create or update both deployments and the drift automation."""
    params_file = params_file.resolve()
    params = load_params(params_file)
    pool = params.deploy.work_pool
    _ensure_process_pool(pool)

    def schedules(cron: str | None, **parameters: str) -> list[Schedule]:
        return [Cron(cron, timezone=params.deploy.timezone, parameters=parameters)] if cron else []

    # Every worker passes this to the flow runs it starts, whatever its own settings.
    heartbeat = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(params.deploy.heartbeat_seconds)}}

    retrain = flow.from_source(source=str(PROJECT_ROOT), entrypoint="flows/retrain.py:retrain")
    retrain_id = retrain.deploy(
        name="retrain",
        work_pool_name=pool,
        description="Fine-tune, evaluate and gate a candidate; promote it to `champion` if it passes.",
        parameters={"params_file": str(params_file), "reason": "manual"},
        schedules=schedules(params.deploy.retrain_cron, reason="schedule"),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        triggers=[drift_trigger(params, params_file)],
        job_variables=heartbeat,
        tags=["llmops", params.registry.model_name],
        print_next_steps=False,
        ignore_warnings=True,
    )
    monitor = flow.from_source(source=str(PROJECT_ROOT), entrypoint="flows/monitor.py:monitor")
    monitor_id = monitor.deploy(
        name="monitor",
        work_pool_name=pool,
        description="Check incoming data for drift against the champion's training data.",
        parameters={"params_file": str(params_file)},
        schedules=schedules(params.deploy.monitor_cron),
        job_variables=heartbeat,
        tags=["llmops", params.registry.model_name],
        print_next_steps=False,
        ignore_warnings=True,
    )
    _mark_silent_runs_crashed(params, [retrain_id, monitor_id])
    return Registered(work_pool=pool, retrain=retrain_id, monitor=monitor_id)


def crashed_when_silent(params: Params, deployments: list[UUID]) -> Automation:
    """Prefect's recipe for runs whose host died (nothing is left there to report it), limited to these
    deployments' runs: once a run has sent a heartbeat, a silence of `crashed_after_seconds` without another
    heartbeat or a final state marks it Crashed."""
    return Automation(
        name=f"{params.registry.model_name}-crashed-when-silent",
        description="Mark a retrain or monitor run whose heartbeats stopped (its host died) as Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": [f"prefect.deployment.{d}" for d in deployments]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=params.deploy.crashed_after_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {params.deploy.crashed_after_seconds:g} s: its host or worker died.",
            )
        ],
    )


def _mark_silent_runs_crashed(params: Params, deployments: list[UUID]) -> None:
    """Create the automation, or replace the one an earlier `llmops deploy` made (its settings may differ)."""
    automation = crashed_when_silent(params, deployments)
    with get_client(sync_client=True) as client:
        for earlier in client.read_automations_by_name(automation.name):
            client.delete_automation(earlier.id)
    automation.create()


def _ensure_process_pool(name: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
