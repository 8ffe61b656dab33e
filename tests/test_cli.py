"""The `llmops` command: exit codes, one-paragraph errors, JSON on the last line."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmops.cli import main
from tests.conftest import PROJECT, write_params


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_validate_accepts_good_data(params_file, assets, capsys):
    args = ["--params", str(params_file), "validate", "--data", str(assets / "data" / "train"), "--json"]
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

    chats = read_conversations(assets / "data" / "train")
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


@pytest.fixture
def bare_params(tmp_path) -> Path:
    """A params file that needs no model: the platform commands only read its work_dir."""
    path = tmp_path / "params.yaml"
    path.write_text(f"work_dir: {tmp_path / 'work'}\n")
    return path


def _state_file(bare_params: Path) -> Path:
    from llmops.config import load_params

    folder = load_params(bare_params).work_dir / "platform"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "platform.json"


@pytest.fixture
def stranger():
    """An unrelated program (its own process group) whose pid a stale state file names."""

    process = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("recorded", ["pid only", "another start time"])
def test_platform_down_never_signals_a_process_that_reuses_a_recorded_pid(bare_params, stranger, capsys, recorded):
    import time

    from llmops.platform import Identity

    me = Identity.of(stranger.pid)
    identity = {} if recorded == "pid only" else {"started": me.started - 1, "command": me.command}
    service = {"name": "prefect-server", "pid": stranger.pid, "log": "server.log", **identity}
    state = _state_file(bare_params)
    state.write_text(json.dumps({"supervisor": stranger.pid, "services": [service]}))

    assert main(["--params", str(bare_params), "platform", "down"]) == 0
    time.sleep(0.5)
    assert stranger.poll() is None  # neither SIGTERM nor SIGKILL reached it
    assert not state.exists()
    assert "The platform is not running." in capsys.readouterr().out


def test_platform_up_over_a_stale_state_file_cleans_it_up_and_leaves_the_stranger_alone(
    bare_params, stranger, capsys, caplog
):
    import socket

    state = _state_file(bare_params)
    service = {"name": "mlflow-ui", "pid": stranger.pid, "log": "ui.log", "started": 1, "command": "mlflow ui"}
    state.write_text(json.dumps({"supervisor": stranger.pid, "services": [service]}))
    with socket.socket() as taken:  # so that `up` stops right after its checks, before starting anything
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert main(["--params", str(bare_params), "platform", "up", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"Port {port}" in err and "already running" not in err
    assert stranger.poll() is None and not state.exists()
    assert "did not stop cleanly" in caplog.text and "now another program" in caplog.text


def test_platform_down_stops_the_recorded_services_that_are_still_ours(bare_params):
    import dataclasses

    from llmops import platform
    from llmops.config import load_params

    folder = platform.state_dir(load_params(bare_params))
    folder.mkdir(parents=True, exist_ok=True)
    ours = platform._start("mlflow-ui", ["sleep", "120"], dict(os.environ), folder)
    platform._record(folder, [ours])
    state = json.loads((folder / "platform.json").read_text())
    assert state["services"][0] == dataclasses.asdict(ours) and ours.started > 0 and "sleep 120" in ours.command
    state["supervisor"] = 2**22 + 7  # a supervisor that died without cleaning up: no one holds the lock
    (folder / "platform.json").write_text(json.dumps(state))

    assert main(["--params", str(bare_params), "platform", "down"]) == 0
    assert platform._exited(ours.pid) and not ours.is_ours()


def test_platform_up_refuses_while_a_supervisor_holds_the_lock(bare_params, capsys):
    from llmops import platform
    from llmops.config import load_params

    folder = platform.state_dir(load_params(bare_params))
    folder.mkdir(parents=True, exist_ok=True)
    platform._record(folder, [])
    held = platform._take_lock(folder)
    try:
        assert main(["--params", str(bare_params), "platform", "up", "--port", "1"]) == 2
    finally:
        held.close()
    assert "already running" in capsys.readouterr().err
    assert (folder / "platform.json").exists()  # a live platform's record is left as it is


HEAVY = ("torch", "transformers", "great_expectations")
IMPORTS_AFTER = """
import sys
from llmops.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("heavy:", [name for name in {heavy!r} if name in sys.modules], file=sys.stderr)
sys.exit(code)
"""


def test_status_lineage_and_help_answer_without_importing_ml_libraries(tmp_path):
    """The quick commands read the registry without MLflow, torch, transformers or Great Expectations, and the
    embedded store's quick reads give what MLflow itself answers."""

    from llmops import registry, tracking
    from tests.conftest import two_champions

    params_file, params = two_champions(tmp_path)
    assert registry.describe_champion(params.tracking, params.registry) == registry.describe_champion(
        params.tracking, params.registry, quick=False
    )
    assert registry.describe_version(params.tracking, params.registry, "1") == registry.describe_version(
        params.tracking, params.registry, "1", quick=False
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    for command in (["status", "--json"], ["lineage", "1"], ["--help"], ["run", "--help"]):
        done = subprocess.run(
            [sys.executable, "-c", IMPORTS_AFTER.format(heavy=(*HEAVY, "mlflow")), "--params", str(params_file)]
            + command,
            capture_output=True,
            text=True,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "heavy: []" in done.stderr, (command, done.stderr[-500:])
    # A rollback writes through MLflow (never behind its back); the quick reads see what it wrote.
    assert main(["--params", str(params_file), "rollback"]) == 0
    assert tracking.champion_version(params.tracking, params.registry).version == 1
    status = registry.describe_champion(params.tracking, params.registry, quick=False)
    assert status == registry.describe_champion(params.tracking, params.registry)
    assert [(e["event"], e["version"]) for e in status["history"]] == [
        ("promote", "1"),
        ("promote", "2"),
        ("rollback", "1"),
    ]
    assert status["reason"] == "manual rollback"


# What only finetune, merge, quantize and evaluate use: an unchanged rerun takes the first three from the cache
# and never reaches evaluate, so it must not pay for importing them (seconds at every start).
STAGE_ONLY = ("peft", "transformers.modeling_utils", "transformers.trainer", "optimum", "gptqmodel", "rouge_score")


def test_the_flow_imports_no_library_that_only_a_cached_stage_needs():
    from tests.conftest import PROJECT

    code = f"import sys, flows.retrain; print([name for name in {STAGE_ONLY!r} if name in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, check=True)
    assert done.stdout.strip() == "[]"


# Gate settings any trained candidate passes: the tests below are about who promotes when, not quality.
LENIENT_GATE = [
    "gate.floors={}",
    "gate.vs_base=[]",
    "gate.vs_champion=[perplexity]",  # compared, so a run shows which champion it was gated against
    "gate.max_perplexity_increase=100",
    "gate.max_quantization_ppl_ratio=100",
]
QUICK_RUN = ["finetune.epochs=2", "quantize.method=none", "evaluate.max_samples=16"]


def llmops_run(params_file: Path, *settings: str, env: dict | None = None) -> subprocess.Popen:

    from tests.conftest import PROJECT

    command = [sys.executable, "-m", "llmops.cli", "--params", str(params_file), "run", "--json"]
    for setting in settings:
        command += ["--set", setting]
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), **(env or {})}
    environment.pop("PREFECT_API_URL", None)  # as from a shell: each run has its own ephemeral Prefect
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_runs_at_once_promote_one_after_the_other(tmp_path, assets):
    """Two `llmops run` started together, both good enough to pass: the second to promote is judged against
    the first's champion (under the registry lock), and the history records both promotions, in order. They
    take turns on the host: no training, merge, quantize or evaluate of one runs while another does."""
    from llmops import tracking
    from llmops.config import load_params

    params_file = write_params(tmp_path, assets)
    runs = [llmops_run(params_file, *QUICK_RUN, *LENIENT_GATE, f"finetune.seed={seed}") for seed in (1, 2)]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=1800)
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
        assert len((out + err).splitlines()) <= 40, out + err  # a person can read it

    params = load_params(params_file)
    client = tracking.client_for(params.tracking)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{params.registry.model_name}'"))
    assert versions == [1, 2]
    history = tracking.champion_history(client, params.registry.model_name)
    assert [(e["event"], e["version"]) for e in history] == [("promote", "1"), ("promote", "2")]
    assert tracking.champion_version(params.tracking, params.registry).version == 2
    first, second = sorted(results, key=lambda r: int(r["promotion"]["version"]))
    assert first["champion"] is None  # nothing to compare with yet
    assert second["champion"] is not None  # judged against the champion the first had just made
    assert any(c["name"] == "perplexity vs champion" for c in second["decision"]["checks"])

    # When each ran: a training from its own record (the finetune stage also spans its wait for the slot).
    trainings = [json.loads(m.read_text()) for m in params.work_dir.glob("runs/*/finetune/llmops_metadata.json")]
    spans = [(t["started_at"], t["finished_at"]) for t in trainings]
    heavy = [s for r in results for s in r["stages"] if s["name"] in ("merge", "quantize", "evaluate")]
    spans += [(s["started_at"], s["started_at"] + s["seconds"]) for s in heavy]
    assert len(spans) == 8
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans)), spans


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_never_stored_or_printed(tmp_path, assets):
    """With LLMOPS_TRACKING_URI carrying a password (a tracking server behind basic auth), the run works and
    the password is nowhere: not in the MLflow store, its artifacts, the work folder or the output. Not even
    in the run's log file when a library prints the URI: here MLflow, allowed to print its "View run at"
    link, does so as the run ends, after the log's copy went to MLflow."""
    import socket
    import time
    import urllib.request

    from llmops.config import load_params

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "s3cret-" + os.urandom(6).hex()
    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{store}/db.sqlite"]
        + ["--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        params_file = write_params(tmp_path, assets)
        uri = f"http://llmops:{secret}@127.0.0.1:{port}"
        prefect_home = tmp_path / "prefect-home"
        env = {"LLMOPS_TRACKING_URI": uri, "PREFECT_HOME": str(prefect_home)}
        env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "false"  # MLflow prints its run link, URI and all
        run = llmops_run(params_file, *QUICK_RUN, "finetune.epochs=1", env=env)
        out, err = run.communicate(timeout=1800)
        assert run.returncode == 0, err[-3000:]
        from mlflow import MlflowClient

        result = json.loads(out.strip().splitlines()[-1])
        logged = MlflowClient(uri).get_run(result["mlflow_run_id"]).data.params["tracking.uri"]
        assert logged == f"http://llmops:***@127.0.0.1:{port}"  # the run went to the server, masked
    finally:
        os.killpg(server.pid, 15)
        server.wait()

    assert secret not in out + err
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []  # the server's store and artifacts, the run folder and its log, Prefect's database
    (log,) = load_params(params_file).work_dir.glob("runs/*/run.log")
    assert f"at: http://llmops:***@127.0.0.1:{port}/#/experiments/" in log.read_text()  # printed, and masked


def test_commands_print_what_a_person_needs_and_name_the_log_with_the_rest(params_file, tmp_path):
    """`llmops validate` on a 300-row export: the verdict and what cleaning did, not Great Expectations' INFO
    lines (about 300 of them), which go to a log file named on the last line."""

    def row(i: int) -> dict:
        return {"conversations": [{"from": "human", "value": f"Color of item {i}?"}, {"from": "gpt", "value": "red"}]}

    rows = [row(i) for i in range(290)] + [row(7)] * 9 + [{"conversations": [{"from": "human", "value": "Hm?"}]}]
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    cli = [sys.executable, "-m", "llmops.cli", "--params", str(params_file)]
    done = subprocess.run([*cli, "validate", "--data", str(export)], capture_output=True, text=True, env=env)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0 and 2 <= len(lines) <= 15, lines
    assert lines[0] == f"{export}: sharegpt format, 300 rows read, 290 kept, valid"
    assert done.stderr.splitlines()[-1].startswith("full log: ")
    log = Path(done.stderr.splitlines()[-1].removeprefix("full log: "))
    assert log.parent == tmp_path / "work" / "logs" and "great_expectations" in log.read_text()

    for command in (["bootstrap"], ["status"]):  # nothing a library says: no log file to name
        done = subprocess.run([*cli, *command], capture_output=True, text=True, env=env)
        assert done.returncode == 0 and len((done.stdout + done.stderr).splitlines()) <= 3, done.stdout + done.stderr
