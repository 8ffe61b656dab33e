"""Register the deployable model as a new version; alias it `champion` if the gate passed, else `challenger`.

The only stage that writes aliases. Lineage is attached to the version as `lineage.*` tags, so any
champion can be traced to its data, code, parameters and runs. Each version also carries the digest of its
model files, so a candidate bit-identical to any registered version (the champion, or a challenger an
earlier rejected run registered) is recognised and registers nothing new.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from llmops import tracking
from llmops.config import RegistryParams, TrackingParams
from llmops.files import folder_digest
from tasks.gate import GateDecision

DIGEST_TAG = "model.digest"


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
    unchanged: bool = False  # the candidate was bit-identical to this champion: nothing was registered


class Champion(BaseModel, frozen=True):
    """The current champion, as the gate will judge against it."""

    model_dir: Path
    version: str
    run_id: str
    identical: bool  # the candidate's model files are bit-identical to the champion's
    # The registered version (the champion or any other) the candidate is bit-identical to, and its alias.
    identical_version: str | None = None
    identical_alias: str | None = None


def fetch_champion(
    tracking_params: TrackingParams, registry: RegistryParams, dest_root: Path, candidate_dir: Path
) -> Champion | None:
    """The champion's model folder (downloaded once per version), and whether the candidate is the same model
    as the champion or as any other registered version (a rejected retrain's challenger, repeated)."""
    current = tracking.champion_version(tracking_params, registry)
    if current is None:
        return None
    model_dir = tracking.download_champion(tracking_params, registry, dest_root)
    digest = folder_digest(candidate_dir)
    identical = current.tags.get(DIGEST_TAG) == digest
    same = current if identical else None
    if same is None:
        client = tracking.client_for(tracking_params)
        versions = client.search_model_versions(f"name='{registry.model_name}'")
        same = next((v for v in versions if v.tags.get(DIGEST_TAG) == digest), None)
        if same is not None:  # a search leaves aliases out; the version itself names them
            same = client.get_model_version(registry.model_name, same.version)
    return Champion(
        model_dir=model_dir,
        version=str(current.version),
        run_id=current.run_id,
        identical=identical,
        identical_version=same and str(same.version),
        identical_alias=tracking.CHAMPION if identical else same and (same.aliases or [""])[0],
    )


def promote(
    registry: RegistryParams,
    tracking_params: TrackingParams,
    decision: GateDecision,
    model_dir: Path,
    lineage: Lineage,
) -> Promotion:
    """Register and alias, under the registry lock (the flow already holds it from evaluation on)."""
    with tracking.registry_lock(tracking_params, registry):
        registered = tracking.register_model(
            tracking_params,
            registry,
            lineage.mlflow_run_id,
            model_dir,
            tags={
                **lineage.as_tags(),
                DIGEST_TAG: folder_digest(model_dir),
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
