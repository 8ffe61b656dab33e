"""Re-run the pipeline on exactly the data and params that made a registered version, and compare.

The data comes back through DVC from the `.dvc` record the original run logged; the params are the
original run's effective params. The rerun registers under `<model>-reproductions`, so reproducing an old
version can never move the production champion.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow
from pydantic import BaseModel

from flows.retrain import retrain
from llmops import tracking
from llmops.config import DEFAULT_PARAMS, load_params
from llmops.data import dvc_root, restore
from llmops.errors import LLMOpsError


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
    root = dvc_root(params.data.train)
    if record is None or root is None:
        raise LLMOpsError(
            f"Version {version} cannot be reproduced exactly: its run logged no DVC record of its data "
            "(the dataset was not DVC-tracked), or this project is not a DVC repository."
        )
    data = restore(record, root)
    tracked = Path(lineage["dataset"]["dvc_file"]).with_suffix("")
    original = lineage["params"]
    original["data"] = {
        split: str(data / Path(lineage["dataset"][split]).relative_to(tracked))
        if Path(lineage["dataset"][split]).is_relative_to(tracked)
        else lineage["dataset"][split]
        for split in ("train", "eval")
    }
    original["registry"]["model_name"] = f"{params.registry.model_name}-reproductions"
    rerun_params = data.parent / "params.yaml"
    rerun_params.write_text(yaml.safe_dump(original))

    summary = retrain(params_file=str(rerun_params), reason=f"reproduce v{version}")
    before = tracking.candidate_metrics(params.tracking, lineage["mlflow_run_id"])
    after = summary.candidate.model_dump()
    return Reproduction(
        version=version,
        dataset_version=lineage["dataset"]["version"],
        mlflow_run_id=summary.mlflow_run_id,
        metrics=[MetricComparison(metric=k, original=v, reproduced=after[k]) for k, v in before.items() if k in after],
    )
