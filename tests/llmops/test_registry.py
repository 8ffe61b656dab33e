"""The registry's quick reads answer only from a store whose schema they know, and fall back to MLflow (with
MLflow's answer) on any other; the registry answers without the tracking module. A real SQLite MLflow store
in a temp folder, written through the promote stage."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from llmops import registry
from tests.conftest import PROJECT, two_champions


def status_json(params_file: Path, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "llmops.cli", "--params", str(params_file), "status", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT), **env},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])["champion"]


def test_the_registry_answers_without_the_tracking_module():
    code = "import sys, llmops.registry; print([m for m in ('llmops.tracking', 'mlflow') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, check=True)
    assert done.stdout.strip() == "[]"


def test_a_store_in_another_workspace_is_read_through_mlflow_with_mlflows_answer(tmp_path, monkeypatch):
    """MLflow's workspaces keep a team's rows under its workspace name, not `default`: the quick read, which
    reads `default`, must not answer "no champion" there."""
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "true")
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    monkeypatch.chdir(tmp_path)
    params_file, params = two_champions(tmp_path)
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        assert con.execute("SELECT DISTINCT workspace FROM registered_models").fetchall() == [("team-a",)]

    expected = registry.describe_champion(params.tracking, params.registry, quick=False)
    assert expected is not None and expected["version"] == 2
    assert registry.describe_champion(params.tracking, params.registry) == expected
    lineage = registry.describe_version(params.tracking, params.registry, "1")
    assert lineage == registry.describe_version(params.tracking, params.registry, "1", quick=False)
    assert lineage["git_commit"] == "c1"
    env = {"MLFLOW_ENABLE_WORKSPACES": "true", "MLFLOW_WORKSPACE": "team-a"}
    assert status_json(params_file, env) == expected  # the command too

    # The rollback writes through MLflow, so it lands in the workspace MLflow writes to (SQL written behind
    # MLflow's back found no history in `default`, and refused).
    assert registry.rollback(params.tracking, params.registry, "bad answers") == ("2", "1")
    status = registry.describe_champion(params.tracking, params.registry)
    assert status == registry.describe_champion(params.tracking, params.registry, quick=False)
    assert status["version"] == 1 and status["reason"] == "bad answers"
    assert [(e["event"], e["version"]) for e in status["history"]] == [
        ("promote", "1"),
        ("promote", "2"),
        ("rollback", "1"),
    ]


def test_a_store_of_another_mlflow_schema_is_never_read_directly(tmp_path):
    """A store migrated by another MLflow version (another alembic revision) may have moved what the quick read
    reads: it is left to MLflow, which here refuses it and says how to migrate it, as it would itself."""
    params_file, params = two_champions(tmp_path)
    assert status_json(params_file, {})["version"] == 2  # the schema it knows: read directly
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        con.execute("UPDATE alembic_version SET version_num = 'f00dfeed0001'")

    for command in (["status"], ["lineage", "1"]):
        done = subprocess.run(
            [sys.executable, "-m", "llmops.cli", "--params", str(params_file), *command],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(PROJECT)},
        )
        assert done.returncode == 1, (command, done.stdout[-2000:])
        assert "out-of-date database schema" in done.stderr and "mlflow db upgrade" in done.stderr
