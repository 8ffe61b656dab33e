"""The production topology on one machine, started once per test session.

- a real `prefect server` whose database is a fresh PostgreSQL database (asyncpg);
- a real `mlflow server` whose backend store is another fresh PostgreSQL database (psycopg2), with its
  artifacts in a shared folder;
- a project (git + DVC, its data pushed to a folder remote) that every "host" sees at the same path, as a
  team's shared storage: the code, the data, the DVC remote, the checkpoints and Prefect's results;
- two process workers on the `llmops` pool standing in for two training hosts: each has its own Prefect home
  and its own temp folder (so nothing local, such as a file lock, is shared between them), and either can
  be killed and started again.

PostgreSQL 15 runs on 127.0.0.1:5432 with trust authentication on every machine of the project. The two
databases are created for the session and dropped after it. The services are started and stopped with the
platform supervisor's own helpers (`llmops.platform`), each in its own process group, told by the kernel
to stop if this test process dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmops import platform
from llmops.config import Params, load_params
from tests.conftest import make_dvc_project

POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
BIN = Path(sys.executable).parent

# Every run here trains the tiny model for a few steps and gates leniently: these tests are about who writes
# the registry when, and what survives a fault, not about model quality.
PROJECT_SETTINGS = {
    "finetune__epochs": 1,
    "finetune__checkpoint_steps": 5,
    "quantize__method": "none",
    "evaluate__max_samples": 8,
    "gate__floors": {},
    "gate__vs_base": [],
    "gate__vs_champion": ["perplexity"],  # compared, so each run shows which champion it was judged against
    "gate__max_perplexity_increase": 100.0,
    "gate__max_quantization_ppl_ratio": 100.0,
    "deploy__retrain_cron": None,  # nothing but the tests starts a run
    "deploy__monitor_cron": None,
    "deploy__drift_cooldown_minutes": 10,
    "deploy__heartbeat_seconds": 30,  # Prefect's shortest
    "deploy__crashed_after_seconds": 75,
    "serve__poll_seconds": 2,
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_admin():
    """A connection to the server's `postgres` database, in autocommit (CREATE/DROP DATABASE need it)."""
    import psycopg2

    try:
        connection = psycopg2.connect(dbname="postgres", connect_timeout=10, **POSTGRES)
    except psycopg2.OperationalError:
        # Every machine of the project starts it before a session; if it stopped since, start it again.
        subprocess.run(START_POSTGRES, shell=True, capture_output=True)
        try:
            connection = psycopg2.connect(dbname="postgres", connect_timeout=30, **POSTGRES)
        except psycopg2.OperationalError as exc:
            pytest.fail(f"PostgreSQL is not answering on 127.0.0.1:5432 ({exc}); start it with `{START_POSTGRES}`.")
    connection.autocommit = True
    return connection


@contextmanager
def fresh_databases(*names: str):
    with closing(postgres_admin()) as admin, admin.cursor() as cursor:
        for name in names:
            cursor.execute(f'CREATE DATABASE "{name}"')
        try:
            yield
        finally:
            for name in names:
                cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')


@dataclass
class Production:
    """The running topology, and what the tests need to drive it like a team would."""

    root: Path
    params_file: Path
    databases: dict[str, str]
    prefect_url: str
    mlflow_url: str
    services: dict[str, platform.Service] = field(default_factory=dict)

    @property
    def params(self) -> Params:
        return load_params(self.params_file)

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    def client_settings(self):
        """Prefect's client in this (test) process, pointed at the server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.api_url})

    def env(self, host: str) -> dict[str, str]:
        """The environment of a process on `host`: the servers' addresses, and that host's own local folders.
        Prefect's results are shared storage (a cached stage is reused on any host)."""
        local = self.root / "hosts" / host
        (local / "tmp").mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(local / "prefect-home"),
            "PREFECT_LOCAL_STORAGE_PATH": str(self.root / "shared" / "prefect-results"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # picks a scheduled run up within seconds
            "LLMOPS_TRACKING_URI": self.mlflow_url,
            "TMPDIR": str(local / "tmp"),
        }

    def llmops(self, *args: str, host: str = "laptop", timeout: float = 600) -> subprocess.CompletedProcess:
        """An `llmops` command, as a team member runs it from their own machine."""
        command = [sys.executable, "-m", "llmops.cli", "--params", str(self.params_file), *args]
        return subprocess.run(command, env=self.env(host), capture_output=True, text=True, timeout=timeout)

    def start_worker(self, host: str) -> platform.Service:
        argv = [str(BIN / "prefect"), "worker", "start", "--pool", self.params.deploy.work_pool, "--type", "process"]
        folder = self.root / "logs"
        service = platform._start(host, [*argv, "--name", host], self.env(host), folder)
        self.services[host] = service
        return service

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL a worker and everything it started (its flow runs, their training processes): the host died.
        Returns the pids killed."""
        import psutil

        worker = psutil.Process(self.services.pop(host).pid)
        victims = [worker, *worker.children(recursive=True)]
        for process in victims:
            process.kill()
        psutil.wait_procs(victims, timeout=30)
        return [p.pid for p in victims]

    def host_of(self, pid: int) -> str | None:
        """The worker host a process (a flow run's) runs under."""
        import psutil

        for host, service in self.services.items():
            if any(child.pid == pid for child in psutil.Process(service.pid).children(recursive=True)):
                return host
        return None

    def stop(self) -> None:
        platform._stop(list(self.services.values()))
        self.services.clear()


@pytest.fixture(scope="session")
def production(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("production")
    session = uuid.uuid4().hex[:8]
    databases = {"prefect": f"llmops_prefect_{session}", "mlflow": f"llmops_mlflow_{session}"}
    prefect_port, mlflow_port = free_port(), free_port()
    (root / "project").mkdir()
    (root / "shared").mkdir()
    (root / "logs").mkdir()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    params_file = make_dvc_project(
        root / "project",
        assets,
        tracking__uri=mlflow_url,
        tracking__artifact_location=str(root / "shared" / "mlartifacts"),
        **PROJECT_SETTINGS,
    )
    topology = Production(root, params_file, databases, f"http://127.0.0.1:{prefect_port}", mlflow_url)
    pg = "postgres@127.0.0.1:5432"
    with fresh_databases(*databases.values()):
        server_env = {
            **topology.env("prefect-server"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg}/{databases['prefect']}",
        }
        mlflow_argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"postgresql://{pg}/{databases['mlflow']}"]
        mlflow_argv += ["--default-artifact-root", str(root / "shared" / "mlartifacts"), "--workers", "2"]
        mlflow_argv += ["--host", "127.0.0.1", "--port", str(mlflow_port)]
        prefect_argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
        try:
            logs = root / "logs"
            topology.services["prefect-server"] = platform._start("prefect-server", prefect_argv, server_env, logs)
            topology.services["mlflow-server"] = platform._start("mlflow-server", mlflow_argv, topology.env("m"), logs)
            platform._wait_healthy(f"{topology.api_url}/health", topology.services["prefect-server"], 300, bool)
            platform._wait_healthy(f"{mlflow_url}/health", topology.services["mlflow-server"], 300, bool)
            deployed = topology.llmops("deploy", "--json")
            assert deployed.returncode == 0, deployed.stderr[-3000:]
            for host in ("host-a", "host-b"):
                topology.start_worker(host)
            yield topology
        finally:
            topology.stop()
