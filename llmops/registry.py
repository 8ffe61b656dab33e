"""Quick answers from the registry for `llmops status` and `llmops lineage`.

Importing MLflow and opening its store costs a couple of seconds, for a question that a few rows answer. On
the embedded store (SQLite, with a local artifact folder) these reads go straight to its tables and files,
read-only; any other store (a tracking server) is asked through MLflow (`llmops.tracking`), which answers
the same questions with the same result. Writes always go through MLflow. The tests compare both paths.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from llmops.config import RegistryParams, TrackingParams
from llmops.errors import LLMOpsError

CHAMPION = "champion"
HISTORY_TAG = "champion_history."
_WORKSPACE = "default"


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


def _candidate_metrics(con: sqlite3.Connection, run_id: str) -> dict[str, float]:
    prefix = "evaluate.candidate."
    rows = con.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)).fetchall()
    return {k.removeprefix(prefix): v for k, v in sorted(rows) if k.startswith(prefix) and k != f"{prefix}rows"}
