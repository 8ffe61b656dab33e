"""The retrain pipeline: [ingest ->] validate -> finetune -> merge -> quantize -> evaluate -> gate -> promote.

Only wiring lives here: each stage is a typed function in `tasks/`, run as a Prefect task. Finetune, merge
and quantize are cached on their inputs and code, so an unchanged rerun skips them. Everything is recorded
in one MLflow run; if any stage raises, the run is marked failed and promote never runs, so the champion
stays where it was.

From fetching the champion to promoting, the run holds the registered model's lock: the gate judges the
champion as it is when the candidate is registered, never one another run replaced meanwhile (a second run
waits, then evaluates against the new champion). A candidate bit-identical to the champion, or to any other
registered version, stops there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from llmops import tracking
from llmops.config import DEFAULT_PARAMS, load_params
from llmops.data import DatasetRef, traffic_eval_split
from llmops.orchestration import cached_stage, stage
from llmops.training import training_slot
from tasks.evaluate import ModelScores, evaluate_models
from tasks.finetune import finetune, training_crashed
from tasks.gate import GateDecision, decide
from tasks.ingest import IngestResult, ingest_dataset
from tasks.merge import merge_adapter
from tasks.promote import Lineage, Promotion, fetch_champion, promote
from tasks.quantize import quantize_model
from tasks.validate import validate_dataset

# The stage functions as Prefect tasks. Finetune, merge and quantize are cached on their inputs and code;
# a training that crashed (killed, out of memory, stalled) is retried once and resumes from its checkpoint.
ingest_task = stage(ingest_dataset)
validate_task = stage(validate_dataset)
finetune_task = cached_stage(finetune, retries=1, retry_condition_fn=training_crashed)
merge_task = cached_stage(merge_adapter)
quantize_task = cached_stage(quantize_model)
fetch_champion_task = stage(fetch_champion)
evaluate_task = stage(evaluate_models)
gate_task = stage(decide)
promote_task = stage(promote)


class RetrainSummary(BaseModel):
    mlflow_run_id: str
    ingest: IngestResult | None  # when the run folded new rows in first (`incoming`)
    dataset: DatasetRef
    stages: list[tracking.StageTiming]
    candidate: ModelScores | None  # None when the candidate was the champion itself (promotion.unchanged)
    champion: ModelScores | None
    decision: GateDecision | None
    promotion: Promotion


@flow(name="retrain")
def retrain(
    params_file: str = str(DEFAULT_PARAMS),
    reason: str = "manual",
    incoming: str | None = None,
    dataset: str | None = None,
    learning_rate: float | None = None,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> RetrainSummary:
    """Fine-tune the base model on the current dataset and promote the result if it passes the gate.

    Args:
        params_file: The params.yaml to run with; paths in it are relative to its folder.
        reason: Why this run happens (manual, schedule, drift, ...); recorded as lineage.
        incoming: New rows to fold into the training set first (a JSONL file or a folder of them), checked
            like `llmops ingest` and versioned with DVC; the files then move to `ingested/` beside them. A
            folder's traffic log (`llmops serve`) adds its judged exchanges: corrected, or rated "up".
        dataset: A training split (a JSONL file or a folder of them) to use instead of the params' data.train.
        learning_rate: Fine-tuning learning rate for this run (default: params' finetune.learning_rate).
        epochs: Fine-tuning epochs for this run (default: params' finetune.epochs).
        overrides: Any other params.yaml values for this run, as dotted keys, e.g. {"finetune.lora.r": 8}.
    """
    named = {"data.train": dataset, "finetune.learning_rate": learning_rate, "finetune.epochs": epochs}
    overrides = {**(overrides or {}), **{key: value for key, value in named.items() if value is not None}}
    params = load_params(Path(params_file), overrides)
    flow_run_id = str(runtime.flow_run.id)
    run_dir = params.work_dir / "runs" / flow_run_id
    root = Path(params_file).resolve().parent
    tags = {"prefect_flow_run_id": flow_run_id, "reason": reason, "git_commit": tracking.git_commit(root)}

    with tracking.TrackedRun(params, run_name=runtime.flow_run.name, tags=tags, run_dir=run_dir) as run:
        ingest = None
        if incoming:  # new rows are validated on their own and combined before anything else reads the data
            ingest = run.stage(
                "ingest",
                ingest_task,
                params.validate_,
                params.model.base,
                params.finetune.max_seq_len,
                Path(incoming),
                params.data.train,
                params.data.eval,
                mode="append",
                archive=True,
                excess_length=params.data.excess_length,
                chat_template=params.data.chat_template,
                out=params.work_dir / "cleaned",  # the training set it checks is the one validate finds there
                loop=params.loop,  # what judged traffic may teach, and how much of the set it may take
            )
            # What was folded in, and why the rest was not (judged traffic's drops by reason), like cleaning's.
            run.log_metrics(ingest.metrics())
            run.log_text(ingest.to_markdown(), "ingest_report.md")
            create_markdown_artifact(ingest.to_markdown(), key="ingest-report", description="Ingest and judged traffic")
        validation = run.stage(
            "validate",
            validate_task,
            params.validate_,
            params.model.base,
            params.finetune.max_seq_len,
            params.data.train,
            params.data.eval,
            docs_dir=run_dir / "data_docs",
            out=params.work_dir / "cleaned",  # what trains and evaluates; named by content, so caches hold
            excess_length=params.data.excess_length,
            chat_template=params.data.chat_template,
        )
        run.log_text(validation.to_markdown(), "data_validation.md")
        run.log_metrics({f"data.{s.path.stem}.{k}": v for s in validation.splits for k, v in s.counts().items()})
        run.log_artifacts(run_dir / "data_docs", "data_docs")
        create_markdown_artifact(validation.to_markdown(), key="data-validation", description="Data validation")
        data = validation.require_valid()  # bad data stops the run here, before anything trains
        run.set_tags(data.lineage_tags())
        if data.dvc_file:
            run.log_file(data.dvc_file, "dataset.dvc")  # with it, `dvc pull` restores this exact data
        for split in (data.train, data.eval):  # the exact rows that trained and evaluated
            run.log_file(split, f"data_cleaned/{split.name}")
        traffic_eval = traffic_eval_split(params.data.train)  # judged traffic held out (loop.eval_share)
        traffic_eval = traffic_eval if traffic_eval.is_file() else None
        if traffic_eval:
            run.log_file(traffic_eval, f"data_cleaned/{traffic_eval.name}")
        adapter = run.stage(
            "finetune",
            finetune_task,
            params.finetune,
            params.model,
            data,
            out=run_dir / "finetune",
            checkpoints=params.work_dir / "checkpoints",
            device=params.model.device,
            dtype=params.model.dtype,
        )
        # Merge, quantize and evaluate run the model on this host's cores or GPU, like a training: each takes the
        # host's slot (`finetune.host_slots`), so two runs on one host take turns instead of sharing it.
        with training_slot(params.finetune.host_slots, 1):
            merged = run.stage(
                "merge",
                merge_task,
                params.merge,
                params.model,
                adapter,
                data,
                out=run_dir / "merge",
                device=params.model.device,
            )
            deployable = run.stage(
                "quantize",
                quantize_task,
                params.quantize,
                merged,
                data,
                out=run_dir / "quantize",
                device=params.model.device,
                dtype=params.model.dtype,
            )
        with tracking.registry_lock(params.tracking, params.registry):  # one promotion at a time per model
            champion = run.stage(
                "fetch_champion",
                fetch_champion_task,
                params.tracking,
                params.registry,
                params.work_dir / "champions",
                deployable.model_dir,
            )
            # Bit-identical to the champion or to any registered version (a rejected retrain repeated): nothing
            # new to judge or to register.
            if champion is not None and champion.identical_version is not None:
                run.set_tags({"unchanged_from_version": champion.identical_version})
                same = Promotion(
                    model_name=params.registry.model_name,
                    version=champion.identical_version,
                    alias=champion.identical_alias or "",
                    unchanged=True,
                )
                return RetrainSummary(
                    mlflow_run_id=run.run_id,
                    ingest=ingest,
                    dataset=data,
                    stages=run.timings,
                    candidate=None,
                    champion=None,
                    decision=None,
                    promotion=same,
                )
            with training_slot(params.finetune.host_slots, 1):  # taken inside the registry lock, never around it
                report = run.stage(
                    "evaluate",
                    evaluate_task,
                    params.evaluate,
                    deployable.model_dir,
                    params.model.base,
                    champion and champion.model_dir,
                    data,
                    out=run_dir / "evaluate",
                    device=params.model.device,
                    dtype=params.model.dtype,
                    traffic_eval=traffic_eval,
                )
            # A run that learnt from new judged traffic must answer the held-out traffic better than the champion.
            new_traffic = bool(ingest and ingest.traffic and ingest.traffic.folded)
            decision = run.stage("gate", gate_task, params.gate, report, deployable, new_traffic=new_traffic)
            run.log_text(decision.to_markdown(), "gate_report.md")
            create_markdown_artifact(decision.to_markdown(), key="gate-report", description="Promotion gate")
            lineage = Lineage(
                dataset_hash=data.digest,
                git_commit=tags["git_commit"],
                params_hash=params.digest(),
                prefect_flow_run_id=flow_run_id,
                mlflow_run_id=run.run_id,
                reason=reason,
            )
            promotion = run.stage(
                "promote", promote_task, params.registry, params.tracking, decision, deployable.model_dir, lineage
            )

    return RetrainSummary(
        mlflow_run_id=run.run_id,
        ingest=ingest,
        dataset=data,
        stages=run.timings,
        candidate=report.candidate,
        champion=report.champion,
        decision=decision,
        promotion=promotion,
    )
