"""Re-run the pipeline on exactly the data and params that made a registered version, and compare.

The data comes back through DVC from the `.dvc` record the original run logged; the params are the
original run's effective params. The rerun registers under `<model>-reproductions`, passed as an explicit
override that wins over LLMOPS_REGISTERED_MODEL, so reproducing an old version can never move the production
champion, whatever the environment says.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from prefect import flow
from pydantic import BaseModel

from flows.retrain import retrain
from llmops import tracking
from llmops.config import DEFAULT_PARAMS, load_params
from llmops.data import dvc_root, restore_files
from llmops.errors import LLMOpsError
from llmops.files import mask_secrets


class MetricComparison(BaseModel):
    metric: str
    original: float
    reproduced: float

    @property
    def difference(self) -> float:
        return self.reproduced - self.original


class Reproduction(BaseModel):
    version: str
    dataset_version: str
    mlflow_run_id: str
    metrics: list[MetricComparison]


@flow(name="reproduce")
def reproduce(version: str, params_file: str = str(DEFAULT_PARAMS)) -> Reproduction:
    params = load_params(Path(params_file))
    lineage = tracking.describe_version(params.tracking, params.registry, version)
    record = lineage["dataset_record"]
    if record is None or dvc_root(params.data.train) is None:
        raise LLMOpsError(
            f"Version {version} cannot be reproduced exactly: its run logged no DVC record of its data "
            "(the dataset was not DVC-tracked), or this project is not a DVC repository."
        )
    splits = [Path(lineage["dataset"][split]) for split in ("train", "eval")]
    train, eval_ = restore_files(record, Path(lineage["dataset"]["dvc_file"]), splits)
    original = lineage["params"]
    original["data"] = {**original["data"], "train": str(train), "eval": str(eval_)}
    # The logged params have credentials masked: the rerun writes to this project's store, as configured now.
    # A secret that came from the environment stays there (it wins again when the rerun loads its params).
    uri = params.tracking.uri
    original["tracking"]["uri"] = mask_secrets(uri) if os.environ.get("LLMOPS_TRACKING_URI") == uri else uri
    rerun_params = params.work_dir / "reproductions" / f"v{version}.yaml"  # logged params are absolute paths
    rerun_params.parent.mkdir(parents=True, exist_ok=True)
    rerun_params.write_text(yaml.safe_dump(original))

    name = f"{params.registry.model_name}-reproductions"
    summary = retrain(
        params_file=str(rerun_params), reason=f"reproduce v{version}", overrides={"registry.model_name": name}
    )
    if summary.promotion.model_name != name:  # the one guarantee this flow gives: never the production name
        raise LLMOpsError(f"The reproduction registered under {summary.promotion.model_name!r}, not {name!r}.")
    before = tracking.candidate_metrics(params.tracking, lineage["mlflow_run_id"])
    if summary.candidate is None:  # bit-identical to the last reproduction: its scores are this model's
        champion = tracking.champion_version(params.tracking, params.registry.model_copy(update={"model_name": name}))
        after = tracking.candidate_metrics(params.tracking, champion.run_id)
    else:
        after = summary.candidate.model_dump()
    return Reproduction(
        version=version,
        dataset_version=lineage["dataset"]["version"],
        mlflow_run_id=summary.mlflow_run_id,
        metrics=[MetricComparison(metric=k, original=v, reproduced=after[k]) for k, v in before.items() if k in after],
    )
