"""The platform's promises on the production topology (see conftest.py): Prefect and MLflow servers on
PostgreSQL, two worker hosts, shared storage. The tests run in order on one topology, as a team's week would:
a drift storm makes the first champion; two retrains started together promote one at a time; the command
line and a server follow the tracking server; a host dies during training and another resumes its run; the
database drops its connections during a run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import PrefectHTTPStatusError

from flows.monitor import DRIFT_EVENT, dataset_resource
from llmops import registry
from llmops.training import newest_complete_checkpoint
from tests.conftest import register, wait_until
from tests.production.conftest import Production, free_port, postgres_admin

pytestmark = pytest.mark.slow


def retrain_runs(production: Production, reason: str | None = None, deployed: bool = True) -> list:
    """The retrain flow's runs, from its deployment (or, with deployed=False, from anywhere)."""
    with production.client_settings(), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"])) if deployed else None,
            limit=200,
        )
    return [r for r in runs if reason is None or r.parameters.get("reason") == reason]


def read_run(production: Production, run_id):
    with production.client_settings(), get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def finished(production: Production, run_id, timeout: float = 900):
    def final():
        try:
            run = read_run(production, run_id)
        except PrefectHTTPStatusError as exc:  # the server's database is away (the outage test): ask again
            if exc.response.status_code < 500:
                raise
            return None
        return run if run.state and run.state.is_final() else None

    return wait_until(final, timeout, f"flow run {run_id} to finish", every=2)


def start_retrain(production: Production, reason: str, **overrides) -> object:
    with production.client_settings(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/retrain")
        return client.create_flow_run_from_deployment(
            deployment.id, parameters={"reason": reason, "overrides": overrides}
        )


def logged(production: Production, run_id, text: str) -> bool:
    with production.client_settings(), get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return any(text in log.message for log in logs)


def versions(production: Production) -> list[int]:
    client = registry.client_for(production.params.tracking)
    found = client.search_model_versions(f"name='{production.params.registry.model_name}'")
    return sorted(int(v.version) for v in found)


def history(production: Production) -> list[tuple[str, str]]:
    client = registry.client_for(production.params.tracking)
    events = registry.champion_history(client, production.params.registry.model_name)
    return [(e["event"], e["version"]) for e in events]


def judged_against(production: Production, version: int) -> str | None:
    """The champion version the run that registered `version` was gated against (its fetch_champion result)."""
    client = registry.client_for(production.params.tracking)
    run_id = client.get_model_version(production.params.registry.model_name, str(version)).run_id
    champion = json.loads(Path(client.download_artifacts(run_id, "stages/fetch_champion.json")).read_text())
    return champion and champion["version"]


def test_a_storm_of_drift_events_starts_one_retrain_which_makes_the_first_champion(production):
    params = production.params
    storm = [
        {
            "id": str(uuid.uuid4()),
            "occurred": datetime.now(UTC).isoformat(),
            "event": DRIFT_EVENT,
            "resource": {"prefect.resource.id": dataset_resource(params.registry.model_name)},
            "payload": {"incoming": ""},  # nothing to fold in: a plain retrain
        }
        for _ in range(50)
    ]
    httpx.post(f"{production.api_url}/events", json=storm, timeout=30).raise_for_status()

    [run] = wait_until(lambda: retrain_runs(production, "drift"), 180, "the automation to start a retrain")
    run = finished(production, run.id)
    assert run.state.is_completed(), run.state
    # The whole storm reached the automation long before this run ended: it started this one run, no other.
    assert [r.id for r in retrain_runs(production, "drift")] == [run.id]
    champion = registry.champion_version(params.tracking, params.registry)
    assert int(champion.version) == 1 and champion.tags["lineage.prefect_flow_run_id"] == str(run.id)


def test_two_retrains_started_together_promote_in_turn_under_the_prefect_lock(production):
    """A scheduled retrain on a worker and a team member's `llmops run` on their own machine, started at once.
    Their hosts share no file lock, so only the registry's Prefect global concurrency limit keeps them apart.
    The test holds that lock first: both runs must come to it and wait, and nothing may be registered while
    it is held; released, they promote one at a time, each judged against the champion the other made."""
    params = production.params
    assert versions(production) == [1]
    with production.client_settings(), registry.registry_lock(params.tracking, params.registry):
        on_worker = start_retrain(production, "together-worker", **{"finetune.seed": 1})
        command = [sys.executable, "-m", "llmops.cli", "--params", str(production.params_file), "run", "--json"]
        command += ["--reason", "together-laptop", "--set", "finetune.seed=2"]
        on_laptop = subprocess.Popen(
            command, env=production.env("laptop"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

        def both_wait_for_the_lock() -> bool:
            assert versions(production) == [1], "a run registered a version while the registry lock was held"
            assert on_laptop.poll() is None, on_laptop.communicate()[1][-3000:]
            assert not read_run(production, on_worker.id).state.is_final()
            runs = [on_worker.id, *[r.id for r in retrain_runs(production, "together-laptop", deployed=False)]]
            return len(runs) == 2 and all(logged(production, r, "waiting for the registry lock") for r in runs)

        try:
            wait_until(both_wait_for_the_lock, 900, "both runs to wait for the registry lock", every=2)
        except BaseException:
            on_laptop.kill()  # nothing of a failed test outlives it
            raise

    worker_run = finished(production, on_worker.id)
    out, err = on_laptop.communicate(timeout=900)
    assert worker_run.state.is_completed(), worker_run.state
    assert on_laptop.returncode == 0, err[-3000:]
    assert versions(production) == [1, 2, 3]
    assert history(production) == [("promote", "1"), ("promote", "2"), ("promote", "3")]
    assert [judged_against(production, v) for v in (2, 3)] == ["1", "2"]
    assert int(registry.champion_version(params.tracking, params.registry).version) == 3


@contextlib.contextmanager
def serving(production: Production):
    """`llmops serve` on a host of its own, following the tracking server; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "llmops.cli", "--params", str(production.params_file), "serve"]
    log = production.root / "logs" / "serve.log"
    with log.open("ab") as output:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(
            [*command, "--port", str(port)], env=production.env("serving"), stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 300, "llmops serve to answer /health", every=0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def served_version(url: str) -> str:
    question = {"messages": [{"role": "user", "content": "What color is the tiger?"}], "max_tokens": 4}
    answer = httpx.post(f"{url}/v1/chat/completions", json=question, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["model"]


def test_the_command_line_and_the_server_follow_the_tracking_server(production, assets):
    """`llmops status`, `lineage` and `rollback` answer from the tracking server (the SQLite quick path does
    not apply and falls back to MLflow), and `llmops serve` follows a rollback and a promotion made there."""
    params = production.params
    name = params.registry.model_name

    def llmops_json(*args: str) -> dict:
        done = production.llmops(*args, "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    with serving(production) as url:
        assert served_version(url) == f"{name}/3"
        status = llmops_json("status")["champion"]
        assert status == json.loads(json.dumps(registry.describe_champion(params.tracking, params.registry)))
        assert status["version"] == 3 and status["history"][-1]["event"] == "promote"
        lineage = llmops_json("lineage", "2")
        run = registry.client_for(params.tracking).get_run(lineage["mlflow_run_id"])
        assert lineage["prefect_flow_run_id"] == run.data.tags["prefect_flow_run_id"]
        assert lineage["dataset"]["version"] and lineage["restore_data"][-1].startswith("dvc pull")
        assert lineage["params"]["finetune"]["seed"] in (1, 2)

        assert llmops_json("rollback", "--reason", "answers got worse") == {
            "ok": True,
            "from_version": "3",
            "to_version": "2",
        }
        wait_until(lambda: served_version(url) == f"{name}/2", 300, "the server to follow the rollback", every=2)

        with production.client_settings():  # a promotion made on the tracking server, under the platform's lock
            promoted = register(params, assets / "model")
        assert promoted == "4"
        wait_until(lambda: served_version(url) == f"{name}/4", 300, "the server to follow the promotion", every=2)
    assert history(production)[-2:] == [("rollback", "2"), ("promote", "4")]


def test_a_host_killed_during_finetune_crashes_its_run_and_a_retry_elsewhere_resumes_from_the_checkpoint(
    production,
):
    params = production.params
    champion_before = registry.describe_champion(params.tracking, params.registry)
    run = start_retrain(production, "host-dies", **{"finetune.epochs": 2, "finetune.seed": 3})

    def checkpoint() -> Path | None:
        return next(
            (c for folder in (params.work_dir / "checkpoints").glob("*") if (c := newest_complete_checkpoint(folder))),
            None,
        )

    saved = wait_until(checkpoint, 900, "training to save a checkpoint", every=0.5)
    running = read_run(production, run.id)
    assert running.state.is_running(), running.state
    pid = int(running.infrastructure_pid.split(":")[-1])
    dead_host = production.host_of(pid)
    assert dead_host is not None
    production.kill_host(dead_host)
    try:
        crashed = wait_until(
            lambda: (r := read_run(production, run.id)).state.is_crashed() and r,
            params.deploy.crashed_after_seconds + 180,
            "the server to mark the silent run Crashed",
            every=2,
        )
        assert "No heartbeat" in crashed.state.message
        assert registry.describe_champion(params.tracking, params.registry) == champion_before  # nothing moved

        retry = subprocess.run(
            [str(Path(sys.executable).with_name("prefect")), "flow-run", "retry", str(run.id)],
            env=production.env("laptop"),
            capture_output=True,
            text=True,
        )
        assert retry.returncode == 0, retry.stdout + retry.stderr
        second = wait_until(
            lambda: (
                (r := read_run(production, run.id)).infrastructure_pid not in (None, running.infrastructure_pid) and r
            ),
            300,
            "a worker to take the retry",
        )
        resumed_on = production.host_of(int(second.infrastructure_pid.split(":")[-1]))
        done = finished(production, run.id)
    finally:
        production.start_worker(dead_host)

    assert done.state.is_completed(), done.state
    assert done.run_count == 2 and resumed_on not in (None, dead_host)
    client = registry.client_for(params.tracking)
    attempts = client.search_runs(
        [client.get_experiment_by_name(params.tracking.experiment).experiment_id],
        filter_string=f"tags.prefect_flow_run_id = '{run.id}'",
        order_by=["attributes.start_time ASC"],
    )
    assert [a.info.status for a in attempts] == ["FAILED", "FINISHED"]  # the dead attempt is not left "running"
    step, resumed = int(saved.name.split("-")[-1]), attempts[1].data.metrics["finetune.resumed_from_step"]
    assert resumed >= step > 0
    print(f"killed after the checkpoint of step {step}; the retry on {resumed_on} resumed from step {resumed:g}")


def test_postgres_dropping_every_connection_during_a_run_leaves_nothing_half_written_trusted(production):
    """While a retrain runs, both servers' databases refuse connections for a few seconds and lose every
    connection they had, again and again. The run recovers (the clients retry) or fails cleanly: it ends,
    and the registry is consistent: the champion is what its history says, and a run that failed moved
    nothing."""
    params = production.params
    champion_before = registry.describe_champion(params.tracking, params.registry)
    run = start_retrain(production, "db-outages", **{"finetune.seed": 4})
    databases = list(production.databases.values())
    outages: list[float] = []
    stop = threading.Event()

    def drop_connections() -> None:
        with contextlib.closing(postgres_admin()) as admin, admin.cursor() as cursor:
            while not stop.wait(6):
                for name in databases:
                    cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ANY(%s)", (databases,)
                )
                outages.append(time.monotonic())
                time.sleep(4)
                for name in databases:
                    cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    wait_until(lambda: read_run(production, run.id).state.is_running(), 300, "the run to start")
    injector = threading.Thread(target=drop_connections, daemon=True)
    injector.start()
    try:
        final = finished(production, run.id, timeout=1200)
    finally:
        stop.set()
        injector.join(timeout=30)
    assert len(outages) >= 2
    print(f"{len(outages)} outages; the run ended {final.state.type.value}: {final.state.message}")

    client = registry.client_for(params.tracking)
    champion = registry.champion_version(params.tracking, params.registry)
    stack = registry.champion_stack(registry.champion_history(client, params.registry.model_name))
    assert stack[-1] == str(champion.version)  # the alias and the history agree
    mine = [
        v
        for v in client.search_model_versions(f"name='{params.registry.model_name}'")
        if v.tags.get("lineage.prefect_flow_run_id") == str(run.id)
    ]
    if final.state.is_completed():
        [version] = mine
        assert str(champion.version) == str(version.version) and "model.digest" in version.tags
    else:
        assert registry.describe_champion(params.tracking, params.registry) == champion_before
        assert all(str(v.version) != str(champion.version) for v in mine)
