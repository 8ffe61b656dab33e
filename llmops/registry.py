"""The registry's lock, and quick answers for `llmops status`, `lineage` and `rollback`.

Importing MLflow and opening its store costs a couple of seconds (far more on a busy machine), for a
question that a few rows answer. On the embedded store (SQLite, with a local artifact folder) these commands
go straight to its tables and files: reads, and the rollback's alias move and history entry, in one SQLite
transaction under the registry lock. Any other store (a tracking server) is asked through MLflow
(`llmops.tracking`), which answers the same questions with the same result; the tests compare both paths.
Promotion, which logs and registers a model, always goes through MLflow.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from llmops.config import RegistryParams, TrackingParams
from llmops.errors import LLMOpsError
from llmops.files import exclusive, mask_secrets

CHAMPION = "champion"
HISTORY_TAG = "champion_history."
_WORKSPACE = "default"


# Locks this process holds, by key, with their depth: the lock is re-entrant within a process (the flow holds
# it around evaluate-gate-promote, and promote takes it again), exclusive between processes.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


@contextmanager
def registry_lock(tracking: TrackingParams, registry: RegistryParams) -> Iterator[None]:
    """One writer at a time for this registered model, with what the stores offer.

    - A file lock (flock) beside an embedded SQLite store, which every process using that store can see; for
      a remote tracking server, in the temp folder (this machine only: add a Prefect API for more).
    - Also a Prefect global concurrency limit of 1 (`llmops-registry-<model>`, created on first use) when a
      Prefect API is configured, which every worker of that API sees, on any machine.
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
            if _prefect_api_configured():
                stack.enter_context(_prefect_limit(f"llmops-registry-{registry.model_name}"))
            stack.enter_context(exclusive(_lock_path(tracking, registry), "waiting for another run to promote"))
            yield
    finally:
        with _held_guard:
            _held[key] -= 1


def _prefect_api_configured() -> bool:
    if "prefect" not in sys.modules:  # the quick commands never import Prefect for this
        return bool(os.environ.get("PREFECT_API_URL"))
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


@contextmanager
def _prefect_limit(name: str) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run may create it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, strict=True):
        yield


def _lock_path(tracking: TrackingParams, registry: RegistryParams) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in registry.model_name)
    if tracking.uri.startswith("sqlite:///"):
        store = Path(tracking.uri.removeprefix("sqlite:///").split("?")[0])
        return store.with_name(f"{store.name}.locks") / f"{safe}.lock"
    digest = hashlib.sha256(mask_secrets(tracking.uri).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "llmops-locks" / f"{digest}-{safe}.lock"


def champion_stack(history: list[dict[str, str]]) -> list[str]:
    """Replay the history: a promotion pushes a version, a rollback pops one. The top is the champion."""
    stack: list[str] = []
    for event in history:
        if event["event"] == "promote":
            stack.append(event["version"])
        elif event["event"] == "rollback" and stack:
            stack.pop()
    return stack


def rollback(tracking: TrackingParams, registry: RegistryParams, reason: str) -> tuple[str, str]:
    """Move `champion` back to the version it displaced; returns (from_version, to_version)."""
    db = _embedded_store(tracking)
    if db is None or not db.exists():
        from llmops import tracking as mlflow_tracking

        return mlflow_tracking.rollback(tracking, registry, reason)
    name = registry.model_name
    with registry_lock(tracking, registry), closing(sqlite3.connect(db, timeout=30)) as con:
        con.execute("BEGIN IMMEDIATE")
        history = _history(con, name)
        stack = champion_stack(history)
        if len(stack) < 2:
            raise LLMOpsError(
                f"Registered model {name!r} has no previous champion to roll back to "
                f"(champion history holds {len(stack)} promotion(s)). Nothing was changed."
            )
        current, previous = stack[-1], stack[-2]
        now = int(time.time() * 1000)
        event = {
            "event": "rollback",
            "version": previous,
            "from": current,
            "reason": reason,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "by": getpass.getuser(),
        }
        con.execute(
            "UPDATE registered_model_aliases SET version = ? WHERE workspace = ? AND name = ? AND alias = ?",
            (int(previous), _WORKSPACE, name, CHAMPION),
        )
        con.execute(
            "INSERT OR REPLACE INTO model_version_tags (key, value, name, version, workspace) VALUES (?, ?, ?, ?, ?)",
            (f"{CHAMPION}_reason", reason, name, int(previous), _WORKSPACE),
        )
        con.execute(
            "INSERT INTO registered_model_tags (key, value, name, workspace) VALUES (?, ?, ?, ?)",
            (f"{HISTORY_TAG}{_last_history_number(con, name) + 1:04d}", json.dumps(event), name, _WORKSPACE),
        )
        con.execute(
            "UPDATE registered_models SET last_updated_time = ? WHERE workspace = ? AND name = ?",
            (now, _WORKSPACE, name),
        )
        con.commit()
    return current, previous


def describe_champion(tracking: TrackingParams, registry: RegistryParams) -> dict[str, Any] | None:
    """What `llmops status` shows: the champion version, its metrics, lineage and history."""
    db = _embedded_store(tracking)
    if db is None:
        from llmops import tracking as mlflow_tracking

        return mlflow_tracking.describe_champion(tracking, registry)
    if not db.exists():
        return None
    name = registry.model_name
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


def describe_version(tracking: TrackingParams, registry: RegistryParams, version: str) -> dict[str, Any]:
    """What `llmops lineage` shows: where a registered version came from, and how to get its data back."""
    db = _embedded_store(tracking)
    if db is None:
        from llmops import tracking as mlflow_tracking

        return mlflow_tracking.describe_version(tracking, registry, version)
    name = registry.model_name
    unknown = LLMOpsError(
        f"Registered model {name!r} has no version {version}; `llmops status` lists the champion and its history."
    )
    if not db.exists() or not version.isdigit():
        raise unknown
    with closing(_connect(db)) as con:
        row = con.execute(
            "SELECT v.run_id, r.artifact_uri FROM model_versions v JOIN runs r ON r.run_uuid = v.run_id "
            "WHERE v.workspace = ? AND v.name = ? AND v.version = ?",
            (_WORKSPACE, name, int(version)),
        ).fetchone()
        if row is None:
            raise unknown
        run_id, artifact_uri = row
        if not artifact_uri.startswith("file:"):  # artifacts in an object store: MLflow knows how to fetch them
            from llmops import tracking as mlflow_tracking

            return mlflow_tracking.describe_version(tracking, registry, version)
        artifacts = Path(unquote(urlparse(artifact_uri).path))
        tags = _version_tags(con, name, int(version))
        run_tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall())
        aliases = [
            alias
            for (alias,) in con.execute(
                "SELECT alias FROM registered_model_aliases WHERE workspace = ? AND name = ? AND version = ?",
                (_WORKSPACE, name, int(version)),
            )
        ]
    params = json.loads((artifacts / "params.json").read_text())
    gate_file, record_file = artifacts / "stages" / "gate.json", artifacts / "dataset.dvc"
    decision = json.loads(gate_file.read_text()) if gate_file.exists() else None
    record = record_file.read_text() if record_file.exists() else None
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
        "version": str(int(version)),
        "aliases": aliases,
        "dataset": {k.removeprefix("dataset."): v for k, v in run_tags.items() if k.startswith("dataset.")},
        "dataset_record": record,
        "restore_data": restore,
        "git_commit": tags.get("lineage.git_commit", "unknown"),
        "params_hash": tags.get("lineage.params_hash"),
        "params": params,
        "gate": decision,
        "prefect_flow_run_id": tags.get("lineage.prefect_flow_run_id"),
        "mlflow_run_id": run_id,
        "reason": tags.get("lineage.reason"),
    }


def _embedded_store(tracking: TrackingParams) -> Path | None:
    """The SQLite file of an embedded store (`sqlite:////abs/path`), else None."""
    if not tracking.uri.startswith("sqlite:///"):
        return None
    return Path(tracking.uri.removeprefix("sqlite:///").split("?")[0])


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)


def _version_tags(con: sqlite3.Connection, name: str, version: int) -> dict[str, str]:
    query = "SELECT key, value FROM model_version_tags WHERE workspace = ? AND name = ? AND version = ?"
    return dict(con.execute(query, (_WORKSPACE, name, version)).fetchall())


def _history(con: sqlite3.Connection, name: str) -> list[dict[str, str]]:
    query = "SELECT key, value FROM registered_model_tags WHERE workspace = ? AND name = ?"
    rows = con.execute(query, (_WORKSPACE, name)).fetchall()
    return [json.loads(value) for key, value in sorted(rows) if key.startswith(HISTORY_TAG)]


def _last_history_number(con: sqlite3.Connection, name: str) -> int:
    query = "SELECT key FROM registered_model_tags WHERE workspace = ? AND name = ?"
    keys = [key for (key,) in con.execute(query, (_WORKSPACE, name)) if key.startswith(HISTORY_TAG)]
    return max((int(key.removeprefix(HISTORY_TAG)) for key in keys), default=0)


def _candidate_metrics(con: sqlite3.Connection, run_id: str) -> dict[str, float]:
    prefix = "evaluate.candidate."
    rows = con.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)).fetchall()
    return {k.removeprefix(prefix): v for k, v in sorted(rows) if k.startswith(prefix) and k != f"{prefix}rows"}
