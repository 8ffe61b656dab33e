"""The retrain flow end to end on real Prefect (test harness), real MLflow (SQLite) and real tiny models."""

import json
import signal
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from safetensors.torch import load_file

from flows.reproduce import reproduce
from flows.retrain import retrain
from llmops import tracking
from llmops.config import load_params
from llmops.data import read_conversations, tracked_version
from llmops.modeling import load_model
from tasks.ingest import ingest_dataset
from tasks.merge import MergeFidelityError
from tasks.validate import InvalidData
from tests.conftest import make_dvc_project, training_processes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def champion(params) -> str | None:
    version = tracking.champion_version(params.tracking, params.registry)
    return version and str(version.version)


def runs_by_status(params) -> dict[str, int]:
    client = tracking.client_for(params.tracking)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    counts: dict[str, int] = {}
    for run in client.search_runs([experiment.experiment_id]):
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return counts


@pytest.fixture(scope="module")
def project(tmp_path_factory, assets):
    """One project whose first run made a champion; later tests run against it in order."""
    folder = tmp_path_factory.mktemp("project")
    params_file = make_dvc_project(folder, assets)
    first = retrain(params_file=str(params_file), reason="test")
    return params_file, first


def test_first_run_trains_every_stage_and_registers_a_champion(project):
    params_file, first = project
    params = load_params(params_file)
    assert [t.name for t in first.stages] == [
        "validate",
        "finetune",
        "merge",
        "quantize",
        "fetch_champion",
        "evaluate",
        "gate",
        "promote",
    ]
    assert not any(t.cached for t in first.stages)
    assert first.champion is None and first.decision.passed
    assert first.candidate.exact_match > 0.5 > first.decision.checks[3].reference  # fine-tune beat the base
    assert first.promotion.alias == "champion" and champion(params) == first.promotion.version

    client = tracking.client_for(params.tracking)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["finetune.lora.r"] == str(params.finetune.lora.r)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) > 10
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"params.json", "gate_report.md", "data_validation.md", "data_docs", "stages", "dataset.dvc"} <= artifacts
    version = tracking.champion_version(params.tracking, params.registry)
    assert version.run_id == run.info.run_id
    assert version.tags["lineage.mlflow_run_id"] == run.info.run_id
    assert version.tags["lineage.params_hash"] == params.digest()


def test_training_progress_streams_into_the_finetune_task_logs(project):
    params_file, first = project
    params = load_params(params_file)
    run = tracking.client_for(params.tracking).get_run(first.mlflow_run_id)
    APILogHandler().flush()  # send what is still queued
    with get_client(sync_client=True) as client:
        flow_run_id = UUID(run.data.tags["prefect_flow_run_id"])
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        finetune_runs = {
            r.id
            for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
            if r.name.startswith("finetune")
        }
    progress = [log for log in logs if "[rank 0]" in log.message and "loss" in log.message]
    assert len(progress) >= 10, [log.message for log in logs][-20:]
    assert {log.task_run_id for log in progress} <= finetune_runs  # under the finetune task, in the UI too


def test_unchanged_rerun_is_cached_and_registers_nothing_new(project):
    params_file, first = project
    params = load_params(params_file)
    second = retrain(params_file=str(params_file), reason="test")
    cached = {t.name for t in second.stages if t.cached}
    assert cached == {"finetune", "merge", "quantize"}
    # The candidate is the champion itself, bit for bit: nothing to evaluate, nothing to register.
    assert [t.name for t in second.stages][-1] == "fetch_champion"
    assert second.promotion.unchanged and second.promotion.version == first.promotion.version
    assert second.decision is None and champion(params) == first.promotion.version
    client = tracking.client_for(params.tracking)
    assert len(client.search_model_versions(f"name='{params.registry.model_name}'")) == 1
    assert client.get_run(second.mlflow_run_id).data.tags["unchanged_from_version"] == first.promotion.version


def test_a_changed_stage_param_reruns_that_stage_and_everything_after(project):
    params_file, _ = project
    third = retrain(params_file=str(params_file), overrides={"merge.check_prompts": 3}, reason="test")
    assert {t.name: t.cached for t in third.stages if t.name in ("finetune", "merge", "quantize")} == {
        "finetune": True,
        "merge": False,
        "quantize": False,
    }


def test_a_rejected_candidate_becomes_challenger_and_champion_stays(project):
    params_file, _ = project
    params = load_params(params_file)
    before = champion(params)
    # A different quantization makes a different candidate (an identical one would register nothing).
    overrides = {"gate.floors.exact_match": 1.0, "quantize.calibration_samples": 32}
    rejected = retrain(params_file=str(params_file), overrides=overrides, reason="test")
    assert not rejected.decision.passed and rejected.promotion.alias == "challenger"
    assert champion(params) == before

    # The same rejected retrain again (a repeated drift event): the candidate is the challenger, bit for bit,
    # so nothing is judged or registered twice.
    versions = len(tracking.client_for(params.tracking).search_model_versions(f"name='{params.registry.model_name}'"))
    again = retrain(params_file=str(params_file), overrides=overrides, reason="drift")
    assert again.promotion.unchanged and again.decision is None
    assert (again.promotion.version, again.promotion.alias) == (rejected.promotion.version, "challenger")
    client = tracking.client_for(params.tracking)
    assert len(client.search_model_versions(f"name='{params.registry.model_name}'")) == versions
    assert champion(params) == before


def test_the_monitor_fires_once_until_new_judged_traffic_arrives(project, tmp_path):
    """No retrain storm: the same champion, batch and judgments fire one drift event, not one an hour."""
    from flows.monitor import monitor
    from tasks.bootstrap import build_incoming_batch
    from tests.data.traffic_rows import judged, served, write_log

    params_file, _ = project
    params = load_params(params_file)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    build_incoming_batch(params.bootstrap, incoming / "drifted.jsonl", drifted=True)
    write_log(incoming / "traffic", [served(1, "What color is the okapi?", "brown", version="0")], [judged(1)])
    client = tracking.client_for(params.tracking)

    def event() -> str:
        monitor(params_file=str(params_file), incoming=str(incoming))
        experiment = client.get_experiment_by_name(f"{params.tracking.experiment}-monitor")
        order = ["attributes.start_time DESC"]
        [latest] = client.search_runs([experiment.experiment_id], order_by=order, max_results=1)
        return latest.data.tags["drift_event"]

    assert [event(), event()] == ["emitted", "held_back"]
    write_log(incoming / "traffic", [], [judged(1, "down", "a reviewer's better answer")])  # new judged traffic
    assert event() == "emitted"


def test_a_two_rank_zero3_run_goes_through_every_stage(project):
    """DeepSpeed ZeRO-3 on 2 CPU ranks: the adapter is gathered whole from the weight shards, merges,
    quantizes, is evaluated, gated and promoted. That path is what is tested, so its gate is one that two
    epochs pass; the shipped gate's checks have their own tests (the first run here, the rejection, the traffic)."""
    params_file, _ = project
    params = load_params(params_file)
    before = champion(params)
    distributed = {"finetune.distributed.processes": 2, "finetune.distributed.zero_stage": 3, "finetune.epochs": 2}
    # A gate two epochs pass, so the run must go all the way to a new champion.
    lenient = {"gate.floors": {}, "gate.vs_base": [], "gate.vs_champion": [], "gate.max_quantization_ppl_ratio": 100}
    run = retrain(params_file=str(params_file), overrides=distributed | lenient, reason="test")
    assert [t.name for t in run.stages][1:4] == ["finetune", "merge", "quantize"] and run.stages[-1].name == "promote"
    client = tracking.client_for(params.tracking)
    stage = json.loads(Path(client.download_artifacts(run.mlflow_run_id, "stages/finetune.json")).read_text())
    assert stage["world_size"] == 2 and stage["loss_history"][-1] < stage["loss_history"][0] * 0.5
    weights = load_file(Path(stage["adapter_dir"]) / "adapter_model.safetensors")
    base = load_model(params.model.base)
    for name, tensor in weights.items():  # ZeRO-3 shards would be empty or flat, not rank-r matrices
        layer = base.get_submodule(name.removeprefix("base_model.model.").split(".lora_")[0])
        expected = (params.finetune.lora.r, layer.in_features)
        assert tuple(tensor.shape) == (expected if "lora_A" in name else (layer.out_features, expected[0])), name
    assert run.decision.passed and run.promotion.alias == "champion"
    assert champion(params) == run.promotion.version != before


def test_a_killed_training_is_retried_and_resumes_from_its_checkpoint(project):
    """Prefect retries a finetune whose training process died (here kill -9, as the OOM killer does);
    the retry resumes from the newest checkpoint and the run goes on to promote."""
    params_file, _ = project
    params = load_params(params_file)
    killed = threading.Event()

    def kill_training_at_step_40():
        deadline = time.monotonic() + 300
        while not killed.is_set() and time.monotonic() < deadline:
            if list((params.work_dir / "checkpoints").glob("*/checkpoint-40/trainer_state.json")):
                for process in training_processes():
                    process.send_signal(signal.SIGKILL)
                    killed.set()
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_training_at_step_40)
    watcher.start()
    # A new training, not a cached one; four epochs (100 steps) leave room to kill it after a checkpoint.
    overrides = {"finetune.seed": 1, "finetune.checkpoint_steps": 20, "finetune.epochs": 4}
    run = retrain(params_file=str(params_file), overrides=overrides, reason="test")
    watcher.join()
    assert killed.is_set()
    client = tracking.client_for(params.tracking)
    stage = json.loads(Path(client.download_artifacts(run.mlflow_run_id, "stages/finetune.json")).read_text())
    assert stage["resumed_from_step"] >= 40 and run.stages[-1].name == "promote"


def broken_run(case: str, tmp_path: Path) -> tuple[dict, type[Exception]]:
    """Overrides that make a run fail in the given way, and the error it must fail with."""
    if case == "invalid-data":
        bad = tmp_path / "train.jsonl"
        bad.write_text('{"prompt": "What color is the tiger?", "response": "brown"}\n{oops\n')
        return {"data.train": str(bad)}, InvalidData
    if case == "unreadable-eval-file":  # no Data Docs can be built for it: still a clean failure
        (tmp_path / "eval.jsonl").write_text("")
        return {"data.eval": str(tmp_path / "eval.jsonl")}, InvalidData
    return {"merge.max_relative_error": 1e-15}, MergeFidelityError  # a stage that crashes after training


@pytest.mark.parametrize("case", ["invalid-data", "unreadable-eval-file", "crashed-stage"])
def test_a_failed_run_leaves_the_champion_and_is_marked_failed(project, tmp_path, case):
    params_file, _ = project
    params = load_params(params_file)
    overrides, error = broken_run(case, tmp_path)
    before, failed_before = champion(params), runs_by_status(params).get("FAILED", 0)
    with pytest.raises(error):
        retrain(params_file=str(params_file), overrides=overrides, reason="test")
    assert champion(params) == before
    assert runs_by_status(params)["FAILED"] == failed_before + 1
    if case == "invalid-data":  # the validation report is kept with the failed run
        client = tracking.client_for(params.tracking)
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        [failed] = client.search_runs([experiment.experiment_id], "attributes.status = 'FAILED'", max_results=1)
        assert failed.data.tags["failed_stage"] == "validate"
        report = client.download_artifacts(failed.info.run_id, "data_validation.md")
        assert "not valid JSON" in Path(report).read_text()


def test_lineage_of_the_champion_matches_what_was_trained(project):
    params_file, first = project
    params = load_params(params_file)
    lineage = tracking.describe_version(params.tracking, params.registry, first.promotion.version)
    dvc_file, dvc_version = tracked_version(params.data.train)
    assert lineage["dataset"]["version"] == dvc_version
    assert lineage["dataset"]["dvc_file"] == str(dvc_file)
    assert lineage["dataset"]["train_rows"] == str(len(read_conversations(params.data.train)))
    assert lineage["restore_data"][-1] == f"dvc pull {dvc_file}"
    assert lineage["params_hash"] == params.digest() and lineage["params"]["finetune"]["lora"]["r"] == 16
    assert lineage["gate"]["passed"] is True
    assert lineage["git_commit"] != "unknown"
    client = tracking.client_for(params.tracking)
    saved = Path(client.download_artifacts(first.mlflow_run_id, "dataset.dvc")).read_text()
    assert saved == dvc_file.read_text()


def test_ingest_then_retrain_records_the_new_dataset_version(project, tmp_path):
    params_file, first = project
    params = load_params(params_file)
    new = tmp_path / "new.jsonl"
    new.write_text(
        "".join(f'{{"prompt": "What color is the zebra number {i}?", "response": "silver"}}\n' for i in range(12))
    )
    ingested = ingest_dataset(
        params.validate_,
        params.model.base,
        params.finetune.max_seq_len,
        new,
        params.data.train,
        params.data.eval,
        "append",
        out=params.work_dir / "cleaned",  # as a drift retrain's ingest checks it
    )
    walks = params.work_dir / "cleaned" / ".walks"
    checked = set(walks.iterdir())
    retrained = retrain(params_file=str(params_file), reason="test")
    assert not next(t for t in retrained.stages if t.name == "finetune").cached  # new data, new training
    # Validate walked nothing again: the training set is the one the ingest checked, the eval split unchanged.
    assert set(walks.iterdir()) == checked
    lineage = tracking.describe_version(params.tracking, params.registry, retrained.promotion.version)
    old = tracking.describe_version(params.tracking, params.registry, first.promotion.version)
    assert lineage["dataset"]["version"] == ingested.version != old["dataset"]["version"]
    assert lineage["dataset"]["train_rows"] == str(ingested.rows_after)


def test_reproduce_restores_the_versions_own_data_and_params(project, monkeypatch):
    params_file, first = project  # runs after the ingest above: the current data is no longer v1's
    params = load_params(params_file)
    champion_before = champion(params)
    # Even when the environment names the production model, the rerun registers under its own name.
    monkeypatch.setenv("LLMOPS_REGISTERED_MODEL", params.registry.model_name)
    result = reproduce(version=first.promotion.version, params_file=str(params_file))
    client = tracking.client_for(params.tracking)
    assert client.search_model_versions(f"name='{params.registry.model_name}-reproductions'")
    assert result.dataset_version == first_dataset_version(params, first)
    rerun = tracking.client_for(params.tracking).get_run(result.mlflow_run_id)
    assert rerun.data.tags["dataset.version"] == result.dataset_version
    assert rerun.data.params["finetune.learning_rate"] == str(params.finetune.learning_rate)
    by_metric = {m.metric: m for m in result.metrics}
    assert abs(by_metric["exact_match"].difference) <= 0.05 and abs(by_metric["perplexity"].difference) < 0.1
    assert champion(params) == champion_before  # a reproduction never moves the champion


def first_dataset_version(params, first) -> str:
    return tracking.describe_version(params.tracking, params.registry, first.promotion.version)["dataset"]["version"]


def test_a_drift_retrain_that_answers_the_held_out_traffic_worse_keeps_the_champion(project, tmp_path):
    """Users ask the champion what it already answers well: the colours of the demo's things, in the demo's
    words. Careless reviewers correct the answers that train to the wrong colours; those the prompt hash held
    out, to the right ones. The retrain learns the wrong colours, so it does not answer the held-out traffic
    better than the champion, and the shipped gate keeps the champion for that reason."""
    from llmops.data import Conversation, Turn
    from llmops.serving.traffic_log import held_out
    from tasks.bootstrap import COLORS, KINDS, QUESTIONS, SYSTEM_PROMPT, world
    from tests.data.traffic_rows import judged, served, write_log

    params_file, _ = project
    params = load_params(params_file)
    before = champion(params)
    facts = world(params.bootstrap.seed)
    entities = [e for kind in ("animal", "fruit") for e in KINDS[kind].split()]
    rows, judgments = [], []
    for i, (entity, question) in enumerate((e, q) for e in entities for q in QUESTIONS["color"]):
        prompt = (Turn("system", SYSTEM_PROMPT), Turn("user", question.format(entity=entity)))
        true = facts[entity]["color"]
        evaluated = held_out(Conversation((*prompt, Turn("assistant", true))), params.loop.eval_share)
        wrong = COLORS[(COLORS.index(true) + 1) % len(COLORS)]
        rows.append(served(i, [t.as_message() for t in prompt], "I do not know"))
        judgments.append(judged(i, "down", true if evaluated else wrong))
    write_log(tmp_path / "incoming" / "traffic", rows, judgments)

    result = retrain(params_file=str(params_file), incoming=str(tmp_path / "incoming"), reason="drift")
    assert result.ingest.traffic.folded > 0 and result.ingest.traffic.held_out > 0
    failed = {check.name for check in result.decision.checks if not check.passed}
    assert "better on traffic" in failed, result.decision.to_markdown()
    assert result.promotion.alias == "challenger" and champion(params) == before
