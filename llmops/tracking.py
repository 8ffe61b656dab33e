"""MLflow: one run per retrain, the model registry, and the champion's history.

With the promote stage, this is the only code that touches the registry. Aliases: `champion` is the model
in production, `challenger` the latest candidate the gate rejected. Every change of champion is appended to
the registered model's tags as a `champion_history.NNNN` event, so who is champion, since when and why can
always be read back, and a rollback replays that history instead of guessing.

Every write to a registered model's versions, aliases and history happens under `registry_lock`, one writer
at a time per registered model, whichever process or machine it runs on.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
from llmops.errors import LLMOpsError
from llmops.files import exclusive, mask_secrets, masked
from llmops.registry import CHAMPION, HISTORY_TAG, champion_stack, registry_lock

log = logging.getLogger(__name__)
progress = logging.getLogger(console.PROGRESS)

CHALLENGER = "challenger"


_opened: set[str] = set()


def client_for(tracking: TrackingParams) -> MlflowClient:
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
        if self.run_dir is not None:
            console.move_log(self.run_dir)
        # Credentials in URIs (a tracking server's password, say) are masked: the store keeps no secret.
        effective = masked(self.params.model_dump(mode="json", by_alias=True))
        flat = _flatten(effective)
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
        self.client.log_dict(self.run_id, effective, "params.json")
        return self

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
        start = time.perf_counter()
        state = task(*args, return_state=True, **kwargs)
        result = state.result()  # re-raises the stage's exception
        timing = StageTiming(name, time.perf_counter() - start, cached=state.name == "Cached")
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

    The model class is `llmops.serve.TextGenerator`, and the `llmops` package ships with the model
    (`code_paths`), so `mlflow models serve` runs it in a fresh environment without this project installed."""
    import llmops
    from llmops.serve import TextGenerator, model_signature

    client_for(tracking)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TextGenerator(),
            artifacts={"model": str(model_dir)},
            code_paths=[str(Path(llmops.__file__).parent)],
            signature=model_signature(),
            pip_requirements=_requirements(),
        )
    return mlflow.register_model(info.model_uri, registry.model_name, tags=tags)


# What the shipped code imports to load and run a model (GPTQ checkpoints need optimum + gptqmodel).
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "optimum", "gptqmodel", "pyyaml")


def _requirements() -> list[str]:
    """Public releases only: never this project (its code ships with the model, and `llmops` on the package
    index is someone else's), and no local version tag (`2.13.0+cpu` would force a CPU build on a GPU host)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


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


def champion_history(client: MlflowClient, name: str) -> list[dict[str, str]]:
    """Every change of champion, oldest first."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return []
    return [json.loads(tags[key]) for key in sorted(tags) if key.startswith(HISTORY_TAG)]


def champion_version(tracking: TrackingParams, registry: RegistryParams) -> ModelVersion | None:
    try:
        return client_for(tracking).get_model_version_by_alias(registry.model_name, CHAMPION)
    except MlflowException:
        return None


def download_champion(tracking: TrackingParams, registry: RegistryParams, dest_root: Path) -> Path | None:
    """Fetch the champion's model folder (cached per version under `dest_root`); None when there is none."""
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


def rollback(tracking: TrackingParams, registry: RegistryParams, reason: str) -> tuple[str, str]:
    """Move `champion` back to the version it displaced; returns (from_version, to_version)."""
    client = client_for(tracking)
    with registry_lock(tracking, registry):
        stack = champion_stack(champion_history(client, registry.model_name))
        if len(stack) < 2:
            raise LLMOpsError(
                f"Registered model {registry.model_name!r} has no previous champion to roll back to "
                f"(champion history holds {len(stack)} promotion(s)). Nothing was changed."
            )
        current, previous = stack[-1], stack[-2]
        client.set_registered_model_alias(registry.model_name, CHAMPION, previous)
        client.set_model_version_tag(registry.model_name, previous, f"{CHAMPION}_reason", reason)
        _append_history(
            client,
            registry.model_name,
            {"event": "rollback", "version": previous, "from": current, "reason": reason},
        )
    return current, previous


def describe_champion(tracking: TrackingParams, registry: RegistryParams) -> dict[str, Any] | None:
    """What `llmops status` shows: the champion version, its metrics, lineage and history."""
    champion = champion_version(tracking, registry)
    if champion is None:
        return None
    client = client_for(tracking)
    return {
        "model": registry.model_name,
        "version": champion.version,
        "registered_at": datetime.fromtimestamp(champion.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
        "run_id": champion.run_id,
        "metrics": candidate_metrics(tracking, champion.run_id),
        "lineage": {k: v for k, v in champion.tags.items() if k.startswith("lineage.")},
        "reason": champion.tags.get(f"{CHAMPION}_reason", ""),
        "history": champion_history(client, registry.model_name),
    }


def describe_version(tracking: TrackingParams, registry: RegistryParams, version: str) -> dict[str, Any]:
    """What `llmops lineage` shows: where a registered version came from, and how to get its data back."""
    client = client_for(tracking)
    try:
        mv = client.get_model_version(registry.model_name, version)
    except MlflowException:
        raise LLMOpsError(
            f"Registered model {registry.model_name!r} has no version {version}; "
            "`llmops status` lists the champion and its history."
        ) from None
    run = client.get_run(mv.run_id)
    artifacts = {a.path for a in client.list_artifacts(mv.run_id)}
    params = json.loads(Path(client.download_artifacts(mv.run_id, "params.json")).read_text())
    decision = None
    if "stages/gate.json" in {a.path for a in client.list_artifacts(mv.run_id, "stages")}:
        decision = json.loads(Path(client.download_artifacts(mv.run_id, "stages/gate.json")).read_text())
    dvc_file = run.data.tags.get("dataset.dvc_file", "")
    commit = mv.tags.get("lineage.git_commit", "unknown")
    record = (
        Path(client.download_artifacts(mv.run_id, "dataset.dvc")).read_text() if "dataset.dvc" in artifacts else None
    )
    restore = []
    if record and dvc_file:
        restore = [
            f"mlflow artifacts download -u runs:/{mv.run_id}/dataset.dvc -d /tmp/llmops-lineage",
            f"cp /tmp/llmops-lineage/dataset.dvc {dvc_file}",
            f"dvc pull {dvc_file}",
        ]
    return {
        "model": registry.model_name,
        "version": str(mv.version),
        "aliases": list(mv.aliases),
        "dataset": {k.removeprefix("dataset."): v for k, v in run.data.tags.items() if k.startswith("dataset.")},
        "dataset_record": record,  # the .dvc record of the training data, when it was DVC-tracked
        "restore_data": restore,
        "git_commit": commit,
        "params_hash": mv.tags.get("lineage.params_hash"),
        "params": params,
        "gate": decision,
        "prefect_flow_run_id": mv.tags.get("lineage.prefect_flow_run_id"),
        "mlflow_run_id": mv.run_id,
        "reason": mv.tags.get("lineage.reason"),
    }


def candidate_metrics(tracking: TrackingParams, run_id: str) -> dict[str, float]:
    prefix = "evaluate.candidate."
    metrics = client_for(tracking).get_run(run_id).data.metrics
    return {
        k.removeprefix(prefix): v for k, v in sorted(metrics.items()) if k.startswith(prefix) and k != f"{prefix}rows"
    }
