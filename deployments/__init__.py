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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
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

    retrain = flow.from_source(source=str(PROJECT_ROOT), entrypoint="flows/retrain.py:retrain")
    retrain_id = retrain.deploy(
        name="retrain",
        work_pool_name=pool,
        description="Fine-tune, evaluate and gate a candidate; promote it to `champion` if it passes.",
        parameters={"params_file": str(params_file), "reason": "manual"},
        schedules=schedules(params.deploy.retrain_cron, reason="schedule"),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        triggers=[drift_trigger(params, params_file)],
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
        tags=["llmops", params.registry.model_name],
        print_next_steps=False,
        ignore_warnings=True,
    )
    return Registered(work_pool=pool, retrain=retrain_id, monitor=monitor_id)


def _ensure_process_pool(name: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
