import mlflow
import pytest

from llmops import tracking
from llmops.errors import LLMOpsError
from tasks.gate import Check, GateDecision
from tasks.promote import Lineage, fetch_champion, promote

PASS = GateDecision(passed=True, checks=[])
REJECT = GateDecision(
    passed=False,
    checks=[
        Check(
            name="exact_match",
            passed=False,
            candidate=0.1,
            reference=None,
            threshold=">= 0.3",
            reason="exact_match 0.100 is below the floor 0.3",
        )
    ],
)


@pytest.fixture
def promote_once(params, assets):
    client = tracking.client_for(params.tracking)
    experiment = client.create_experiment("promote-tests", artifact_location=params.tracking.artifact_location)

    def run(decision: GateDecision, dataset_hash: str = "d" * 32, model_dir=None):
        run_id = client.create_run(experiment).info.run_id
        lineage = Lineage(
            dataset_hash=dataset_hash,
            git_commit="abc123",
            params_hash="p" * 16,
            prefect_flow_run_id="flow-run",
            mlflow_run_id=run_id,
            reason="test",
        )
        return promote(params.registry, params.tracking, decision, model_dir or assets / "model", lineage)

    return run


def champion(params) -> str | None:
    version = tracking.champion_version(params.tracking, params.registry)
    return version and str(version.version)


def test_passing_candidate_becomes_champion_with_lineage(params, promote_once):
    promotion = promote_once(PASS, dataset_hash="f" * 32)
    assert promotion.alias == "champion" and champion(params) == promotion.version
    version = tracking.champion_version(params.tracking, params.registry)
    assert version.tags["lineage.dataset_hash"] == "f" * 32
    assert {
        "lineage.git_commit",
        "lineage.params_hash",
        "lineage.prefect_flow_run_id",
        "lineage.mlflow_run_id",
    } <= set(version.tags)


def test_registered_model_loads_back_through_mlflow_and_generates(params, promote_once):
    promotion = promote_once(PASS)
    model = mlflow.pyfunc.load_model(f"models:/{params.registry.model_name}@champion")
    [completion] = model.predict([{"prompt": "What color is the tiger?"}], params={"max_new_tokens": 4})
    assert isinstance(completion, str)
    assert (
        tracking.download_champion(params.tracking, params.registry, params.work_dir).joinpath("config.json").exists()
    )
    assert promotion.version == "1"


def test_rejected_candidate_is_challenger_and_champion_stays(params, promote_once):
    first = promote_once(PASS)
    rejected = promote_once(REJECT)
    assert rejected.alias == "challenger" and champion(params) == first.version
    client = tracking.client_for(params.tracking)
    assert client.get_model_version_by_alias(params.registry.model_name, "challenger").version == int(rejected.version)
    assert (
        "below the floor" in client.get_model_version(params.registry.model_name, rejected.version).tags["gate.reasons"]
    )


def test_rollback_walks_back_through_promotions_and_records_why(params, promote_once):
    versions = [promote_once(PASS).version for _ in range(3)]
    assert tracking.rollback(params.tracking, params.registry, "bad answers") == (versions[2], versions[1])
    assert tracking.rollback(params.tracking, params.registry, "still bad") == (versions[1], versions[0])
    assert champion(params) == versions[0]
    with pytest.raises(LLMOpsError, match="no previous champion"):
        tracking.rollback(params.tracking, params.registry, "again")
    assert champion(params) == versions[0]  # a refused rollback changes nothing

    status = tracking.describe_champion(params.tracking, params.registry)
    assert status["version"] == int(versions[0]) and status["reason"] == "still bad"
    assert [(e["event"], e["version"]) for e in status["history"]] == [
        ("promote", "1"),
        ("promote", "2"),
        ("promote", "3"),
        ("rollback", "2"),
        ("rollback", "1"),
    ]


def test_rollback_then_new_promotion_keeps_the_stack(params, promote_once):
    v1, v2 = promote_once(PASS).version, promote_once(PASS).version
    tracking.rollback(params.tracking, params.registry, "regression")
    v3 = promote_once(PASS).version
    assert champion(params) == v3
    assert tracking.rollback(params.tracking, params.registry, "again") == (v3, v1)
    assert v2 == "2"


def test_a_candidate_identical_to_any_registered_version_is_recognised(params, promote_once, assets, tmp_path):
    """A rejected retrain repeated makes the same candidate: it matches the challenger, not only the champion."""
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(assets / "model", other)
    (other / "README.md").write_text("a different model folder\n")
    champion_version = promote_once(PASS, model_dir=other).version
    rejected = promote_once(REJECT)  # assets/model, registered as challenger

    same = fetch_champion(params.tracking, params.registry, tmp_path / "champions", assets / "model")
    assert same.version == champion_version and not same.identical
    assert (same.identical_version, same.identical_alias) == (rejected.version, "challenger")
    itself = fetch_champion(params.tracking, params.registry, tmp_path / "champions", other)
    assert (itself.identical, itself.identical_version, itself.identical_alias) == (True, champion_version, "champion")
    fresh = tmp_path / "fresh-model"
    shutil.copytree(assets / "model", fresh)
    (fresh / "README.md").write_text("never registered\n")
    assert fetch_champion(params.tracking, params.registry, tmp_path / "champions", fresh).identical_version is None
