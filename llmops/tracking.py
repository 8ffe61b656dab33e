"""MLflow: one run per retrain, and registering its model (packaged by `llmops.packaging`) as a new version.

The registered model itself (aliases, the champion's history, rollback, the lock that serializes writers, the
quick answers) is `llmops.registry`; its names are re-exported here for the callers that know them as
`tracking.*`. With the promote stage, these two modules are the only code that touches the registry.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from llmops import console
from llmops.config import Params, RegistryParams, TrackingParams
from llmops.files import mask_secrets, masked
from llmops.registry import (  # noqa: F401  (re-exported: callers know them as tracking.*)
    CHALLENGER,
    CHAMPION,
    HISTORY_TAG,
    candidate_metrics,
    champion_history,
    champion_stack,
    champion_version,
    client_for,
    describe_champion,
    describe_version,
    download_champion,
    registry_lock,
    rollback,
    set_alias,
)

log = logging.getLogger(__name__)
progress = logging.getLogger(console.PROGRESS)


def git_commit(root: Path) -> str:
    """The commit the code ran at, suffixed `-dirty` when the work tree has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


@dataclass
class StageTiming:
    name: str
    seconds: float
    cached: bool
    started_at: float = 0.0  # Unix time the stage was called: says which stages of two runs ran at once


@dataclass
class TrackedRun:
    """One MLflow run for one flow run. Ends FINISHED, or FAILED (with the failing stage) if the block raises."""

    params: Params
    run_name: str
    tags: dict[str, str]
    experiment: str = ""  # default: the params' tracking.experiment
    run_dir: Path | None = None  # the run's folder: its full log (`run.log`) is kept there and in MLflow
    run_id: str = ""
    timings: list[StageTiming] = field(default_factory=list)
    current_stage: str = "setup"
    client: MlflowClient = field(init=False)

    def __enter__(self) -> TrackedRun:
        self.client = client_for(self.params.tracking)
        name = self.experiment or self.params.tracking.experiment
        experiment_id = _experiment_id(self.client, name, self.params.tracking.artifact_location)
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=masked(self.tags))
        self.run_id = run.info.run_id
        if flow_run := self.tags.get("prefect_flow_run_id"):
            self._close_dead_attempts(experiment_id, flow_run)
        if self.run_dir is not None:
            console.move_log(self.run_dir)
        # Credentials in URIs (a tracking server's password, say) are masked: the store keeps no secret.
        effective = masked(self.params.model_dump(mode="json", by_alias=True))
        flat = _flatten(effective)
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
        self.client.log_dict(self.run_id, effective, "params.json")
        return self

    def _close_dead_attempts(self, experiment_id: str, flow_run: str) -> None:
        """An earlier attempt of this flow run whose process died with its host could not end its MLflow run:
        this attempt marks it FAILED, so nothing reads it as live, or as the run's result."""
        query = f"tags.prefect_flow_run_id = '{flow_run}' and attributes.status = 'RUNNING'"
        for earlier in self.client.search_runs([experiment_id], filter_string=query):
            if earlier.info.run_id != self.run_id:
                message = f"its process died; the flow run was retried as MLflow run {self.run_id}"
                self.client.set_tag(earlier.info.run_id, "error", message)
                self.client.set_terminated(earlier.info.run_id, "FAILED")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.client.set_tag(self.run_id, "failed_stage", self.current_stage)
            self.client.set_tag(self.run_id, "error", mask_secrets(str(exc))[:5000])
            progress.info("%-15s FAILED", self.current_stage)
        if self.run_dir is not None and (full_log := console.move_log(self.run_dir)) is not None:
            # As far as it goes (the run itself is over), with any credential a library printed masked.
            self.client.log_text(self.run_id, mask_secrets(full_log.read_text(errors="replace")), "run.log")
        self.client.set_terminated(self.run_id, "FAILED" if exc else "FINISHED")

    def stage(self, name: str, task: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run a Prefect task, time it, and log its result's numbers as metrics and the whole as JSON."""
        self.current_stage = name
        start, started_at = time.perf_counter(), time.time()
        state = task(*args, return_state=True, **kwargs)
        result = state.result()  # re-raises the stage's exception
        timing = StageTiming(name, time.perf_counter() - start, state.name == "Cached", started_at)
        self.timings.append(timing)
        progress.info("%-15s %7.1fs%s", name, timing.seconds, "  (cached)" if timing.cached else "")
        metrics = {f"stage_seconds.{name}": timing.seconds}
        if isinstance(result, BaseModel):
            dump = result.model_dump(mode="json")
            metrics |= {f"{name}.{k}": v for k, v in _flatten(dump).items() if _is_number(v)}
            self.client.log_dict(self.run_id, dump, f"stages/{name}.json")
        self.log_metrics(metrics)
        now = int(time.time() * 1000)
        curve = [Metric("train_loss", loss, now, step) for step, loss in enumerate(getattr(result, "loss_history", []))]
        for start in range(0, len(curve), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=curve[start : start + 1000])
        return result

    def log_metrics(self, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        """Log a folder's files; a folder that was never written (nothing to report) is skipped."""
        if folder.is_dir():
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_file(self, path: Path, artifact_file: str) -> None:
        self.log_text(path.read_text(), artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, mask_secrets(str(value)))


def _experiment_id(client: MlflowClient, name: str, artifact_location: str) -> str:
    """The experiment's id, created if missing (by this run, or by another that got there first)."""
    if experiment := client.get_experiment_by_name(name):
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created by a run started at the same moment
        if experiment := client.get_experiment_by_name(name):
            return experiment.experiment_id
        raise


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def register_model(
    tracking: TrackingParams, registry: RegistryParams, run_id: str, model_dir: Path, tags: dict[str, str]
) -> ModelVersion:
    """Log `model_dir` as an MLflow pyfunc model in `run_id` and register it as a new version.

    The model is packaged by `llmops.packaging` (`TextGenerator`, with the `llmops` package shipped beside it),
    so `mlflow models serve` runs it in a fresh environment without this project installed."""
    from llmops import packaging  # imported here: it loads torch and transformers, which only this call needs

    client_for(tracking)
    model_uri = packaging.log_model(run_id, model_dir)
    return mlflow.register_model(model_uri, registry.model_name, tags=tags)
