"""Shared fixtures: one real tiny model and demo dataset per session, a private params file per test.

Prefect's home and result storage point at a temporary folder before Prefect is imported, so cached stage
results never leak between test sessions or into the user's ~/.prefect.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

# Under `make test` (pytest-xdist, two workers) each worker is a host of its own. Its own temp folder: the
# training slots are lock files there, so its trainings take turns with its own only. Its share of the cores
# for torch: OpenMP threads spin while they wait, so two workers each taking every core would both crawl.
if _WORKER := os.environ.get("PYTEST_XDIST_WORKER"):
    _WORKERS = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    os.environ["TMPDIR"] = tempfile.mkdtemp(prefix=f"llmops-tests-{_WORKER}-")
    tempfile.tempdir = None  # read TMPDIR again

_PREFECT_HOME = tempfile.mkdtemp(prefix="llmops-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(Path(_PREFECT_HOME) / "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DVC_NO_ANALYTICS"] = "1"  # else every `dvc` command the tests run starts a daemon that phones home
os.environ.pop("LLMOPS_TRACKING_URI", None)

import pytest  # noqa: E402
import yaml  # noqa: E402

from llmops.config import Params, load_params  # noqa: E402
from tasks.bootstrap import build_base_model, build_demo_dataset  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


# The longest modules first (a few minutes each here). `make test` runs two pytest-xdist workers that each take
# whole modules in this order (--dist loadfile --no-loadscope-reorder: a module's tests keep their order and
# share its fixtures); a long module handed out last would run alone at the end.
LONGEST_FIRST = [
    "flows/test_retrain.py",
    "test_platform.py",
    "production/test_topology.py",
    "test_architectures.py",
    "tasks/test_finetune.py",
    "test_cli.py",
    "test_real_model.py",
    "test_pipeline_definition.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.path.relative_to(Path(__file__).parent).as_posix()
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the other modules, and every module's tests, keep their order


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """The default bootstrap, built once: `model/` and the demo splits `data/train/` and `data/eval/` (folders)."""
    root = tmp_path_factory.mktemp("assets")
    params = load_params(PROJECT / "params.yaml")
    build_base_model(params.bootstrap, root / "model")
    build_demo_dataset(params.bootstrap, root / "data")
    return root


@pytest.fixture(scope="session")
def demo_data(assets):
    """The demo dataset, validated: what the finetune stage takes."""
    from llmops.config import ValidateParams
    from tasks.validate import validate_dataset

    train, eval_ = assets / "data" / "train", assets / "data" / "eval"
    return validate_dataset(ValidateParams(), str(assets / "model"), 1024, train, eval_).require_valid()


@pytest.fixture(scope="session")
def one_epoch_adapter(assets, demo_data, tmp_path_factory):
    """One epoch of single-process LoRA training on the demo data, shared by the tests that need an adapter."""
    from llmops.config import FinetuneParams
    from tasks.finetune import finetune

    folder = tmp_path_factory.mktemp("one-epoch")
    return finetune(FinetuneParams(epochs=1), str(assets / "model"), demo_data, folder / "ft", folder / "ckpt")


@pytest.fixture(scope="session")
def tiny_architectures(assets, tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight models of eight common architectures (tests/architectures.py), built once."""
    from tests.architectures import ARCHITECTURES, build_tiny_model

    root = tmp_path_factory.mktemp("architectures")
    return {name: build_tiny_model(name, assets / "model", root / name) for name in ARCHITECTURES}


def training_processes() -> list:
    """The training processes (a single one, or the DeepSpeed ranks) this test process has started."""
    import psutil

    return [
        p for p in psutil.Process().children(recursive=True) if "llmops.training" in " ".join(p.cmdline()[:4] or [""])
    ]


def write_params(folder: Path, assets: Path, **overrides) -> Path:
    """The shipped params.yaml, pointed at the session's assets and a private store, plus overrides
    given as `section__key=value`."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["model"]["base"] = str(assets / "model")
    raw["data"] = {"train": str(assets / "data" / "train"), "eval": str(assets / "data" / "eval")}
    raw["tracking"] = {
        "uri": f"sqlite:///{folder / 'mlflow.db'}",
        "artifact_location": str(folder / "mlartifacts"),
        "experiment": "tests",
    }
    raw["work_dir"] = str(folder / "work")
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def params_file(tmp_path, assets) -> Path:
    return write_params(tmp_path, assets)


@pytest.fixture
def params(params_file) -> Params:
    return load_params(params_file)


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect API (SQLite) for tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_dvc_project(folder: Path, assets: Path, **overrides) -> Path:
    """A real git + DVC repository holding a copy of the demo data, tracked and pushed to a local remote;
    returns its params file."""
    import shutil
    import subprocess
    import sys

    from llmops.data import track

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True)

    shutil.copytree(assets / "data", folder / "data" / "demo")
    run("git", "init", "-q")
    run("git", "config", "user.email", "ci@example.com")
    run("git", "config", "user.name", "CI")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(folder / "dvc-storage"))
    track(folder / "data" / "demo")
    params_file = write_params(folder, assets, **overrides)
    raw = yaml.safe_load(params_file.read_text())
    raw["data"] = {"train": "data/demo/train", "eval": "data/demo/eval"}
    params_file.write_text(yaml.safe_dump(raw))
    run("git", "add", "-A")
    run("git", "commit", "-qm", "project with DVC-tracked data")
    return params_file


def register(params: Params, model_dir: Path) -> str:
    """A new version of `model_dir` through the promote stage, as a run whose gate passed: registered and made
    champion. Returns its version."""
    from llmops import tracking
    from tasks.gate import GateDecision
    from tasks.promote import Lineage, promote

    client = tracking.client_for(params.tracking)
    experiment = client.get_experiment_by_name("registered-in-tests") or client.get_experiment(
        client.create_experiment("registered-in-tests", artifact_location=params.tracking.artifact_location)
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    lineage = Lineage(
        dataset_hash="d" * 32,
        git_commit="abc",
        params_hash="p" * 16,
        prefect_flow_run_id="flow-run",
        mlflow_run_id=run_id,
        reason="test",
    )
    return promote(params.registry, params.tracking, GateDecision(passed=True, checks=[]), model_dir, lineage).version


def wait_until(condition, timeout: float, what: str, every: float = 1.0):
    """The first truthy value of `condition()`, polled every `every` seconds; an AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def two_champions(tmp_path: Path) -> tuple[Path, Params]:
    """A store where version 2 displaced version 1; returns its params file and params."""
    from llmops import registry
    from tasks.gate import GateDecision
    from tasks.promote import Lineage, promote

    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        f"tracking: {{uri: 'sqlite:///{tmp_path}/mlflow.db', artifact_location: '{tmp_path}/art'}}\n"
        f"work_dir: {tmp_path / 'work'}\n"
    )
    params = load_params(params_file)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    client = registry.client_for(params.tracking)
    # With workspaces, MLflow places artifacts itself (under the working folder here) and refuses a location.
    workspaces = os.environ.get("MLFLOW_ENABLE_WORKSPACES") == "true"
    location = None if workspaces else params.tracking.artifact_location
    experiment = client.create_experiment("quick", artifact_location=location)
    for number in (1, 2):
        run_id = client.create_run(experiment).info.run_id
        client.log_dict(run_id, {"finetune": {"epochs": number}}, "params.json")
        client.log_metric(run_id, "evaluate.candidate.exact_match", 0.5 + number / 10)
        lineage = Lineage(
            dataset_hash="d",
            git_commit=f"c{number}",
            params_hash="p",
            prefect_flow_run_id="f",
            mlflow_run_id=run_id,
            reason="test",
        )
        (model / "weights.bin").write_text(str(number))  # two different models
        promote(params.registry, params.tracking, GateDecision(passed=True, checks=[]), model, lineage)
    return params_file, params
