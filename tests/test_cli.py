"""The `llmops` command: exit codes, one-paragraph errors, JSON on the last line."""

import json
from pathlib import Path

import pytest

from llmops.cli import main
from tests.conftest import write_params


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_validate_accepts_good_data(params_file, assets, capsys):
    args = ["--params", str(params_file), "validate", "--data", str(assets / "data" / "train.jsonl"), "--json"]
    assert main(args) == 0
    report = last_json(capsys)
    assert report["ok"] and report["rows"] > 100 and report["problems"] == []


@pytest.mark.parametrize("shape", ["messages", "sharegpt", "prompt_response", "prompt_completion", "alpaca"])
def test_validate_json_reports_the_shape_the_drops_by_reason_and_the_verdict(params_file, tmp_path, capsys, shape):
    from tests.llmops.test_data import ROWS

    def row(i: int, answer: str) -> dict:
        text = json.dumps(ROWS[shape]).replace("Q?", f"What color is item {i}?").replace('"A"', json.dumps(answer))
        return json.loads(text)

    data = tmp_path / "export.jsonl"
    rows = [row(i, "red") for i in range(20)] + [row(3, "red"), row(99, "")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # --params after the subcommand works as well as before it.
    assert main(["validate", "--data", str(data), "--json", "--params", str(params_file)]) == 0
    report = last_json(capsys)
    assert report["format"] == shape and report["rows_read"] == 22 and report["rows"] == 20
    assert report["verdict"] == "valid" and report["ok"] and report["dropped_rows"] == 2
    dropped = {g["reason"]: (g["rows"], g["example_lines"]) for g in report["dropped"]}
    assert dropped == {"duplicate": (1, [21]), "short_response": (1, [22])}


def test_validate_rejects_bad_data_with_row_numbers(params_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    assert main(["--params", str(params_file), "validate", "--data", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "line 2: missing field(s): response" in out


def test_validate_of_a_missing_file_is_bad_input(params_file, tmp_path, capsys):
    assert main(["--params", str(params_file), "validate", "--data", str(tmp_path / "absent.jsonl"), "--json"]) == 2
    captured = capsys.readouterr()
    assert "not found" in captured.err and "Traceback" not in captured.err
    assert json.loads(captured.out.splitlines()[-1]) == {
        "ok": False,
        "exit_code": 2,
        "error": captured.err.removeprefix("error: ").strip(),
    }


@pytest.mark.parametrize("setting", ["finetune.learning_rate=fast", "finetune.nope=1", "finetune.learning_rate"])
def test_run_with_bad_overrides_exits_2_before_anything_starts(params_file, capsys, setting):
    assert main(["--params", str(params_file), "run", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_run_with_missing_params_file_exits_2(tmp_path, capsys):
    assert main(["--params", str(tmp_path / "none.yaml"), "run"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_run_with_a_missing_base_model_exits_2_with_one_paragraph(params_file, capsys):
    code = main(["--params", str(params_file), "run", "--set", "model.base=/no/such/model", "--json"])
    assert code == 2
    result = last_json(capsys)
    assert result["ok"] is False and "Model folder /no/such/model does not exist" in result["error"]


def test_status_and_rollback_without_a_champion(tmp_path, assets, capsys):
    params_file = write_params(tmp_path, assets)
    assert main(["--params", str(params_file), "status", "--json"]) == 0
    assert last_json(capsys) == {"ok": True, "champion": None}
    assert main(["--params", str(params_file), "rollback"]) == 2
    assert "no previous champion" in capsys.readouterr().err


def test_ingest_of_bad_data_exits_2_and_names_the_problem(tmp_path, assets, capsys):
    from tests.conftest import make_dvc_project

    params_file = make_dvc_project(tmp_path, assets)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What color is the sled?", "response": "r"}\n' * 12)
    assert main(["--params", str(params_file), "ingest", "--data", str(bad), "--json"]) == 2
    assert "response shorter than 2 characters" in last_json(capsys)["error"]


def test_lineage_of_an_unknown_version_exits_2(params_file, capsys):
    assert main(["--params", str(params_file), "lineage", "7"]) == 2
    assert "has no version 7" in capsys.readouterr().err


def test_status_and_rollback_print_the_champion_history(tmp_path, assets, capsys):
    from llmops import tracking
    from llmops.config import load_params
    from tasks.gate import GateDecision
    from tasks.promote import Lineage, promote

    params_file = write_params(tmp_path, assets)
    params = load_params(params_file)
    client = tracking.client_for(params.tracking)
    experiment = client.create_experiment("cli", artifact_location=params.tracking.artifact_location)
    for _ in range(2):
        run_id = client.create_run(experiment).info.run_id
        lineage = Lineage(
            dataset_hash="d1",
            git_commit="c1",
            params_hash="p1",
            prefect_flow_run_id="f1",
            mlflow_run_id=run_id,
            reason="test",
        )
        promote(params.registry, params.tracking, GateDecision(passed=True, checks=[]), assets / "model", lineage)
    capsys.readouterr()

    assert main(["--params", str(params_file), "status"]) == 0
    out = capsys.readouterr().out
    assert "champion: version 2" in out and "dataset_hash" in out and "promote  v1" in out
    assert main(["--params", str(params_file), "rollback", "--reason", "bad answers", "--json"]) == 0
    assert last_json(capsys) == {"ok": True, "from_version": "2", "to_version": "1"}
    assert main(["--params", str(params_file), "status", "--json"]) == 0
    status = last_json(capsys)["champion"]
    assert status["version"] == 1 and status["history"][-1]["reason"] == "bad answers"


def test_deploy_without_a_prefect_server_exits_2(params_file, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["--params", str(params_file), "deploy"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_harness")
def test_drift_without_a_champion_exits_2(params_file, tmp_path, capsys):
    from llmops.config import load_params
    from tasks.bootstrap import build_incoming_batch

    batch = build_incoming_batch(load_params(params_file).bootstrap, tmp_path / "batch.jsonl")
    assert main(["--params", str(params_file), "drift", "--data", str(batch), "--json"]) == 2
    assert "No champion" in last_json(capsys)["error"]


def test_platform_refuses_a_port_in_use_and_leaves_nothing_running(params_file, capsys):
    import socket

    from llmops.config import load_params

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert main(["--params", str(params_file), "platform", "up", "--port", str(port)]) == 2
    assert f"Port {port}" in capsys.readouterr().err
    assert not (load_params(params_file).work_dir / "platform" / "platform.json").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_run_on_a_messy_multi_turn_export_trains_gates_and_reports_what_was_dropped(tmp_path, assets, capsys):
    from llmops import tracking
    from llmops.config import load_params
    from llmops.data import Conversation, Turn, read_conversations, write_jsonl

    chats = read_conversations(assets / "data" / "train.jsonl")
    assert any(len(c.turns) > 3 for c in chats)  # the demo export is multi-turn, with a system prompt
    rambling = Turn("user", "Tell me " + "more and " * 80 + "what color is the tiger?")
    export = [
        *chats,
        *chats[:5],  # duplicates
        *[Conversation((*c.turns[:-1], Turn("assistant", ""))) for c in chats[5:8]],  # empty replies
        *[Conversation((c.turns[0], rambling, c.turns[-1])) for c in chats[8:10]],  # over max_seq_len
    ]
    write_jsonl(tmp_path / "export.jsonl", export)
    params_file = write_params(tmp_path, assets)
    settings = [f"data.train={tmp_path / 'export.jsonl'}", "finetune.max_seq_len=160", "finetune.epochs=2"]
    args = ["run", "--json", "--set", "quantize.method=none", *[a for s in settings for a in ("--set", s)]]
    assert main([*args, "--params", str(params_file)]) == 0  # whatever the gate decided
    summary = last_json(capsys)
    params = load_params(params_file)
    run = tracking.client_for(params.tracking).get_run(summary["mlflow_run_id"])
    assert json.loads(run.data.tags["dataset.dropped"]) == {"duplicate": 5, "short_response": 3, "excess_length": 2}
    assert run.data.metrics["data.export.dropped.duplicate"] == 5 and run.data.metrics["data.export.rows"] == len(chats)
    report = tracking.client_for(params.tracking).download_artifacts(run.info.run_id, "data_validation.md")
    assert "| duplicate rows (exact copy of an earlier conversation) | 5 |" in Path(report).read_text()
