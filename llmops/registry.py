"""The registered model: its lock, its champion and the champion's history, rollback, and quick answers.

Aliases: `champion` is the model in production, `challenger` the latest candidate the gate rejected. Every
change of champion is appended to the registered model's tags as a `champion_history.NNNN` event, so who is
champion, since when and why can always be read back, and a rollback replays that history instead of
guessing.

Every write (aliases, tags, history) goes through MLflow's client, under `registry_lock`: one writer at a
time per registered model, whichever process or machine it runs on. Reads go through MLflow too, except the
two quick answers (`llmops status`, `llmops lineage`): importing MLflow and opening its store costs a couple
of seconds, far more on a busy machine, for a question a few rows answer. So on the embedded store (SQLite,
local artifacts) they read its tables directly, but only when the store's schema is the one they were written
against (MLflow's alembic revision, the columns they read, the default workspace); any other store (a
tracking server, another MLflow version, workspaces) is asked through MLflow, which gives the same answer
(the tests compare both paths). MLflow is imported inside the functions that use it, never here at the top.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from llmops.config import RegistryParams, TrackingParams
from llmops.errors import LLMOpsError
from llmops.files import exclusive, mask_secrets

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history."


# Locks this process holds, by key, with their depth: the lock is re-entrant within a process (the flow holds
# it around evaluate-gate-promote, and promote takes it again), exclusive between processes.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


@contextmanager
def registry_lock(tracking: TrackingParams, registry: RegistryParams) -> Iterator[None]:
    """One writer at a time for this registered model, with what the stores offer.

    - A file lock (flock) beside an embedded SQLite store, which every process using that store can see (a
      process that cannot open the file cannot write the store either); for a remote tracking server, in this
      machine's temp folder, where it only guards this machine.
    - For a tracking server, also a Prefect global concurrency limit of 1 (`llmops-registry-<model>`, created
      on first use) when a Prefect API is configured, which every worker of that API sees, on any machine:
      the lock that counts on a platform of several hosts. Not for an embedded store, where the file lock
      already excludes every writer, and a slot leaked by a holder that died can outlive its lease on an API
      that does not reclaim expired leases (seen on Prefect's test harness: a slot held 12 minutes past a
      5-minute lease, and every later promotion waiting on it).
    """
    key = f"{tracking.uri}|{registry.model_name}"
    with _held_guard:
        depth = _held.get(key, 0)
        _held[key] = depth + 1
    try:
        if depth:
            yield
            return
        with ExitStack() as stack:
            if prefect_api_configured() and not tracking.uri.startswith("sqlite:///"):
                name = f"llmops-registry-{registry.model_name}"
                stack.enter_context(prefect_limit(name, "waiting for the registry lock: another run holds it"))
            stack.enter_context(exclusive(_lock_path(tracking, registry), "waiting for another run to promote"))
            yield
    finally:
        with _held_guard:
            _held[key] -= 1


def prefect_api_configured() -> bool:
    """Whether a Prefect API is configured, so its global concurrency limits can serialize work across hosts."""
    if "prefect" not in sys.modules:  # the quick commands never import Prefect for this
        return bool(os.environ.get("PREFECT_API_URL"))
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


@contextmanager
def prefect_limit(
    name: str, waiting: str, limit: int = 1, occupy: int = 1, lease_seconds: float = 300, strict: bool = True
) -> Iterator[None]:
    """Hold `occupy` slots of the Prefect global concurrency limit `name` (created with `limit` slots on first
    use) while the block runs; `waiting` is logged once when they are all taken.

    The slots are a lease the holder renews in the background: a holder killed outright frees them once
    `lease_seconds` have passed without a renewal. With `strict`, a renewal that keeps failing stops the block
    (what a lock needs: without its lease it no longer excludes anyone); otherwise the block goes on."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run may create it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            found = client.read_global_concurrency_limit_by_name(name)
    # An operator may have shrunk the limit in the UI below what this caller asks: it gets the whole limit.
    occupy = min(occupy, found.limit)
    if found.active_slots + occupy > found.limit:  # said once, so the run's log shows why it stands still
        log.info("%s (%s)", waiting, name)
    with concurrency(
        name, occupy=occupy, strict=True, lease_duration=lease_seconds, raise_on_lease_renewal_failure=strict
    ):
        yield


def _lock_path(tracking: TrackingParams, registry: RegistryParams) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in registry.model_name)
    if tracking.uri.startswith("sqlite:///"):
        store = Path(tracking.uri.removeprefix("sqlite:///").split("?")[0])
        return store.with_name(f"{store.name}.locks") / f"{safe}.lock"
    digest = hashlib.sha256(mask_secrets(tracking.uri).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "llmops-locks" / f"{digest}-{safe}.lock"


_opened: set[str] = set()


def client_for(tracking: TrackingParams) -> MlflowClient:
    """An MLflow client on the tracking URI (which also becomes MLflow's current one)."""
    import mlflow
    from mlflow import MlflowClient

    # MLflow prints "View run ... at: <tracking URI>" when a run on a tracking server ends: that URI may carry
    # a password, and the output is kept in the run's log.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(tracking.uri)
    if tracking.uri in _opened or not tracking.uri.startswith("sqlite:///"):
        return MlflowClient(tracking.uri)
    # Two processes creating the same new SQLite store at once both create its tables, and the second fails
    # ("table ... already exists"): the first opening in each process is serialized.
    db = Path(tracking.uri.removeprefix("sqlite:///").split("?")[0])
    with exclusive(db.with_name(f"{db.name}.locks") / "open.lock", "waiting for another process to create the store"):
        client = MlflowClient(tracking.uri)
        client.search_registered_models(max_results=1)  # the registry's tables too
    _opened.add(tracking.uri)
    return client


def champion_stack(history: list[dict[str, str]]) -> list[str]:
    """Replay the history: a promotion pushes a version, a rollback pops one. The top is the champion."""
    stack: list[str] = []
    for event in history:
        if event["event"] == "promote":
            stack.append(event["version"])
        elif event["event"] == "rollback" and stack:
            stack.pop()
    return stack


def _not_found(exc: Exception) -> bool:
    """MLflow's answer for a missing registered model or alias; anything else (a store MLflow refuses, a
    server that fails) is an error to report, never "there is no champion"."""
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def champion_version(tracking: TrackingParams, registry: RegistryParams) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    client = client_for(tracking)
    try:
        return client.get_model_version_by_alias(registry.model_name, CHAMPION)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def champion_history(client: MlflowClient, name: str) -> list[dict[str, str]]:
    """Every change of champion, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if _not_found(exc):
            return []
        raise
    return [json.loads(tags[key]) for key in sorted(tags) if key.startswith(HISTORY_TAG)]


def set_alias(tracking: TrackingParams, registry: RegistryParams, alias: str, version: str, reason: str) -> None:
    """Point `alias` at `version`; a new champion is also appended to the champion history."""
    with registry_lock(tracking, registry):
        client = client_for(tracking)
        client.set_registered_model_alias(registry.model_name, alias, version)
        client.set_model_version_tag(registry.model_name, version, f"{alias}_reason", reason)
        if alias == CHAMPION:
            _append_history(client, registry.model_name, {"event": "promote", "version": version, "reason": reason})


def _append_history(client: MlflowClient, name: str, event: dict[str, str]) -> None:
    """Add the next `champion_history.NNNN` tag; callers hold `registry_lock`, so no two appends share a number."""
    tags = client.get_registered_model(name).tags
    numbers = [int(key.removeprefix(HISTORY_TAG)) for key in tags if key.startswith(HISTORY_TAG)]
    event = {**event, "at": datetime.now(UTC).isoformat(timespec="seconds"), "by": getpass.getuser()}
    client.set_registered_model_tag(name, f"{HISTORY_TAG}{max(numbers, default=0) + 1:04d}", json.dumps(event))


def rollback(tracking: TrackingParams, registry: RegistryParams, reason: str) -> tuple[str, str]:
    """Move `champion` back to the version it displaced; returns (from_version, to_version)."""
    name = registry.model_name
    with registry_lock(tracking, registry):
        client = client_for(tracking)
        stack = champion_stack(champion_history(client, name))
        if len(stack) < 2:
            raise LLMOpsError(
                f"Registered model {name!r} has no previous champion to roll back to "
                f"(champion history holds {len(stack)} promotion(s)). Nothing was changed."
            )
        current, previous = stack[-1], stack[-2]
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_model_version_tag(name, previous, f"{CHAMPION}_reason", reason)
        _append_history(client, name, {"event": "rollback", "version": previous, "from": current, "reason": reason})
    return current, previous


def download_champion(tracking: TrackingParams, registry: RegistryParams, dest_root: Path) -> Path | None:
    """Fetch the champion's model folder (cached per version under `dest_root`); None when there is none."""
    import mlflow

    champion = champion_version(tracking, registry)
    if champion is None:
        return None
    dest = dest_root / f"{registry.model_name}-v{champion.version}"
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(f"models:/{registry.model_name}/{champion.version}", dst_path=str(tmp))
        tmp.rename(dest)
    return next(config.parent for config in sorted(dest.rglob("config.json")))


def candidate_metrics(tracking: TrackingParams, run_id: str) -> dict[str, float]:
    prefix = "evaluate.candidate."
    metrics = client_for(tracking).get_run(run_id).data.metrics
    return {
        k.removeprefix(prefix): v for k, v in sorted(metrics.items()) if k.startswith(prefix) and k != f"{prefix}rows"
    }


def describe_champion(tracking: TrackingParams, registry: RegistryParams, quick: bool = True) -> dict[str, Any] | None:
    """What `llmops status` shows: the champion version, its metrics, lineage and history. `quick=False`
    always asks MLflow."""
    db = _embedded_store(tracking)
    if db is not None and not db.exists():
        return None  # no store yet, so no champion (and MLflow would create an empty one)
    if quick and db is not None and _known_store(db):
        return _quick_champion(db, registry.model_name)
    champion = champion_version(tracking, registry)
    if champion is None:
        return None
    client = client_for(tracking)
    return {
        "model": registry.model_name,
        "version": int(champion.version),  # a tracking server says "3", the SQLite store 3
        "registered_at": datetime.fromtimestamp(champion.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
        "run_id": champion.run_id,
        "metrics": candidate_metrics(tracking, champion.run_id),
        "lineage": {k: v for k, v in champion.tags.items() if k.startswith("lineage.")},
        "reason": champion.tags.get(f"{CHAMPION}_reason", ""),
        "history": champion_history(client, registry.model_name),
    }


def describe_version(
    tracking: TrackingParams, registry: RegistryParams, version: str, quick: bool = True
) -> dict[str, Any]:
    """What `llmops lineage` shows: where a registered version came from, and how to get its data back.
    `quick=False` always asks MLflow."""
    name = registry.model_name
    unknown = LLMOpsError(
        f"Registered model {name!r} has no version {version}; `llmops status` lists the champion and its history."
    )
    db = _embedded_store(tracking)
    if db is not None and not db.exists():
        raise unknown
    if quick and db is not None and _known_store(db):
        if not version.isdigit():
            raise unknown
        if (found := _quick_version(db, name, int(version))) is None:
            raise unknown
        if found["artifacts"] is not None:  # in an object store, MLflow knows how to fetch them
            return _lineage(name, found)

    from mlflow.exceptions import MlflowException

    client = client_for(tracking)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        if _not_found(exc):
            raise unknown from None
        raise
    run = client.get_run(mv.run_id)
    files = {a.path for folder in (None, "stages") for a in client.list_artifacts(mv.run_id, folder)}

    def read(path: str) -> str | None:
        return Path(client.download_artifacts(mv.run_id, path)).read_text() if path in files else None

    gate = read("stages/gate.json")
    found = {
        "run_id": mv.run_id,
        "version_tags": mv.tags,
        "run_tags": run.data.tags,
        "aliases": list(mv.aliases),
        "params": json.loads(read("params.json") or "{}"),
        "gate": json.loads(gate) if gate else None,
        "record": read("dataset.dvc"),
    }
    return _lineage(name, {**found, "version": int(mv.version)})


def _lineage(name: str, found: dict[str, Any]) -> dict[str, Any]:
    """The lineage answer, from what either path read."""
    run_id, tags, run_tags, record = found["run_id"], found["version_tags"], found["run_tags"], found["record"]
    dvc_file = run_tags.get("dataset.dvc_file", "")
    restore = []
    if record and dvc_file:
        restore = [
            f"mlflow artifacts download -u runs:/{run_id}/dataset.dvc -d /tmp/llmops-lineage",
            f"cp /tmp/llmops-lineage/dataset.dvc {dvc_file}",
            f"dvc pull {dvc_file}",
        ]
    return {
        "model": name,
        "version": str(found["version"]),
        "aliases": found["aliases"],
        "dataset": {k.removeprefix("dataset."): v for k, v in run_tags.items() if k.startswith("dataset.")},
        "dataset_record": record,  # the .dvc record of the training data, when it was DVC-tracked
        "restore_data": restore,
        "git_commit": tags.get("lineage.git_commit", "unknown"),
        "params_hash": tags.get("lineage.params_hash"),
        "params": found["params"],
        "gate": found["gate"],
        "prefect_flow_run_id": tags.get("lineage.prefect_flow_run_id"),
        "mlflow_run_id": run_id,
        "reason": tags.get("lineage.reason"),
    }


# The quick reads. They were written against this schema of MLflow's SQLite store: its alembic revision (the
# head of the pinned MLflow), the columns they read, and the `default` workspace. A store anything else is read
# through MLflow, never guessed at: a newer MLflow may move a column or change what a row means.
KNOWN_SCHEMA_REVISION = "dc11669786a5"
_READ_COLUMNS = {
    "registered_model_aliases": {"workspace", "name", "alias", "version"},
    "registered_model_tags": {"workspace", "name", "key", "value"},
    "model_versions": {"workspace", "name", "version", "creation_time", "run_id"},
    "model_version_tags": {"workspace", "name", "version", "key", "value"},
    "runs": {"run_uuid", "artifact_uri"},
    "tags": {"run_uuid", "key", "value"},
    "latest_metrics": {"run_uuid", "key", "value"},
}
_WORKSPACE = "default"


def _embedded_store(tracking: TrackingParams) -> Path | None:
    """The SQLite file of an embedded store (`sqlite:////abs/path`), else None."""
    if not tracking.uri.startswith("sqlite:///"):
        return None
    return Path(tracking.uri.removeprefix("sqlite:///").split("?")[0])


def _known_store(db: Path) -> bool:
    """Whether the quick reads may read this store: the schema they know, in the workspace they read."""
    workspace = os.environ.get("MLFLOW_WORKSPACE", "").strip()
    workspaces_on = os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").strip().lower() in ("1", "true", "yes")
    if workspaces_on or workspace not in ("", _WORKSPACE):
        return False
    try:
        with closing(_connect(db)) as con:
            if con.execute("SELECT version_num FROM alembic_version").fetchall() != [(KNOWN_SCHEMA_REVISION,)]:
                return False
            for table, columns in _READ_COLUMNS.items():
                if not columns <= {row[1] for row in con.execute(f"PRAGMA table_info({table})")}:
                    return False
    except sqlite3.Error:  # not an MLflow store, or not one we can read: MLflow will say what it is
        return False
    return True


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)


def _quick_champion(db: Path, name: str) -> dict[str, Any] | None:
    with closing(_connect(db)) as con:
        row = con.execute(
            "SELECT v.version, v.creation_time, v.run_id FROM registered_model_aliases a JOIN model_versions v "
            "ON v.workspace = a.workspace AND v.name = a.name AND v.version = a.version "
            "WHERE a.workspace = ? AND a.name = ? AND a.alias = ?",
            (_WORKSPACE, name, CHAMPION),
        ).fetchone()
        if row is None:
            return None
        version, created, run_id = row
        tags = _version_tags(con, name, version)
        return {
            "model": name,
            "version": int(version),
            "registered_at": datetime.fromtimestamp(created / 1000, UTC).isoformat(timespec="seconds"),
            "run_id": run_id,
            "metrics": _candidate_metrics(con, run_id),
            "lineage": {k: v for k, v in tags.items() if k.startswith("lineage.")},
            "reason": tags.get(f"{CHAMPION}_reason", ""),
            "history": _history(con, name),
        }


def _quick_version(db: Path, name: str, version: int) -> dict[str, Any] | None:
    """The version's rows and its run's files; `artifacts` is None when they are not in a local folder."""
    with closing(_connect(db)) as con:
        row = con.execute(
            "SELECT v.run_id, r.artifact_uri FROM model_versions v JOIN runs r ON r.run_uuid = v.run_id "
            "WHERE v.workspace = ? AND v.name = ? AND v.version = ?",
            (_WORKSPACE, name, version),
        ).fetchone()
        if row is None:
            return None
        run_id, artifact_uri = row
        if not artifact_uri.startswith("file:"):
            return {"artifacts": None}
        tags = _version_tags(con, name, version)
        run_tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall())
        query = "SELECT alias FROM registered_model_aliases WHERE workspace = ? AND name = ? AND version = ?"
        aliases = [alias for (alias,) in con.execute(query, (_WORKSPACE, name, version))]
    artifacts = Path(unquote(urlparse(artifact_uri).path))
    gate_file, record_file = artifacts / "stages" / "gate.json", artifacts / "dataset.dvc"
    return {
        "artifacts": artifacts,
        "version": version,
        "run_id": run_id,
        "version_tags": tags,
        "run_tags": run_tags,
        "aliases": aliases,
        "params": json.loads((artifacts / "params.json").read_text()),
        "gate": json.loads(gate_file.read_text()) if gate_file.exists() else None,
        "record": record_file.read_text() if record_file.exists() else None,
    }


def _version_tags(con: sqlite3.Connection, name: str, version: int) -> dict[str, str]:
    query = "SELECT key, value FROM model_version_tags WHERE workspace = ? AND name = ? AND version = ?"
    return dict(con.execute(query, (_WORKSPACE, name, version)).fetchall())


def _history(con: sqlite3.Connection, name: str) -> list[dict[str, str]]:
    query = "SELECT key, value FROM registered_model_tags WHERE workspace = ? AND name = ?"
    rows = con.execute(query, (_WORKSPACE, name)).fetchall()
    return [json.loads(value) for key, value in sorted(rows) if key.startswith(HISTORY_TAG)]


def _candidate_metrics(con: sqlite3.Connection, run_id: str) -> dict[str, float]:
    prefix = "evaluate.candidate."
    rows = con.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)).fetchall()
    return {k.removeprefix(prefix): v for k, v in sorted(rows) if k.startswith(prefix) and k != f"{prefix}rows"}
