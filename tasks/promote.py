"""Register the deployable model as a new version; alias it `champion` if the gate passed, else `challenger`.

The only stage that writes aliases. Lineage is attached to the version as `lineage.*` tags, so any
champion can be traced to its data, code, parameters and runs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from llmops import tracking
from llmops.config import RegistryParams, TrackingParams
from tasks.gate import GateDecision


class Lineage(BaseModel, frozen=True):
    dataset_hash: str
    git_commit: str
    params_hash: str
    prefect_flow_run_id: str
    mlflow_run_id: str
    reason: str

    def as_tags(self) -> dict[str, str]:
        return {f"lineage.{key}": value for key, value in self.model_dump().items()}


class Promotion(BaseModel, frozen=True):
    model_name: str
    version: str
    alias: str


def promote(
    registry: RegistryParams,
    tracking_params: TrackingParams,
    decision: GateDecision,
    model_dir: Path,
    lineage: Lineage,
) -> Promotion:
    registered = tracking.register_model(
        tracking_params,
        registry,
        lineage.mlflow_run_id,
        model_dir,
        tags={
            **lineage.as_tags(),
            "gate.passed": str(decision.passed),
            "gate.reasons": "; ".join(decision.reasons),
        },
    )
    version = str(registered.version)
    alias = tracking.CHAMPION if decision.passed else tracking.CHALLENGER
    reason = f"gate passed in run {lineage.mlflow_run_id}" if decision.passed else "; ".join(decision.reasons)
    promotion = Promotion(model_name=registry.model_name, version=version, alias=alias)
    tracking.set_alias(tracking_params, registry, alias, version, reason)  # last: nothing can fail after it
    return promotion
