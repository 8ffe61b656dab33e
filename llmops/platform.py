"""The platform on one machine (`make platform`): a Prefect server, a process worker and the MLflow UI, all
on loopback, with the deployments and the drift automation registered.

One supervisor process owns the three services. It records them in `<work_dir>/platform/platform.json`;
Ctrl-C, `llmops platform down` (`make platform-stop`) or the death of any one service stops all of them.
Each service runs in its own process group (so the flow runs a worker started go too) and is told by the
kernel to stop if the supervisor dies, even by SIGKILL; a start after a crash first stops whatever the
last record still names.

Nothing else on the machine is ever signalled. A pid alone proves nothing (the kernel reuses them), so:
the supervisor holds an exclusive lock on `platform.lock` for its whole life (a free lock means no
supervisor is running, whatever the state file says), and every process is recorded with its start time
and command line, which must both still match before it is signalled. A record that names a stranger is
removed with a warning.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from llmops.config import Params
from llmops.errors import LLMOpsError
from llmops.files import mask_secrets

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STATE_FILE = "platform.json"
LOCK_FILE = "platform.lock"  # held by the running supervisor; never deleted, so its inode stays the lock
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Identity:
    """What tells a process apart from a later one that reuses its pid: its start time and command line."""

    pid: int
    started: int  # clock ticks after boot (/proc/<pid>/stat, field 22)
    command: str

    @classmethod
    def of(cls, pid: int) -> Identity | None:
        """The live process's identity; None when it does not exist (or is a zombie)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        fields = stat.rsplit(") ", 1)[-1].split()  # the command name before ") " may hold spaces
        if fields[0] == "Z":
            return None
        text = command.replace(b"\0", b" ").decode(errors="replace").strip()
        return cls(pid=pid, started=int(fields[19]), command=text)


@dataclass(frozen=True)
class Service:
    name: str
    pid: int
    log: str
    url: str = ""
    started: int = -1  # with `command`: the identity recorded at start (see Identity)
    command: str = ""

    def is_ours(self) -> bool:
        """True only while the recorded process itself is alive: same pid, start time and command line."""
        return Identity.of(self.pid) == Identity(self.pid, self.started, self.command)


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000


def state_dir(params: Params) -> Path:
    return params.work_dir / "platform"


def up(params: Params, params_file: Path, ports: Ports, ready_timeout: float = 180) -> int:
    """Start the platform and supervise it until Ctrl-C, SIGTERM or a service dies; returns the exit code."""
    folder = state_dir(params)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(folder)
    if lock is None:
        raise LLMOpsError(
            f"The platform is already running (supervisor pid {_recorded_supervisor(folder)}, which holds "
            f"{folder / LOCK_FILE}). Stop it with `make platform-stop` first."
        )
    try:
        _clear_stale(folder)
        for port in (ports.prefect, ports.mlflow):
            _require_free(port)
        return _supervise(params, params_file, ports, folder, ready_timeout)
    finally:
        lock.close()  # releases the lock


def _supervise(params: Params, params_file: Path, ports: Ports, folder: Path, ready_timeout: float) -> int:
    api_url = f"http://{HOST}:{ports.prefect}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "prefect-home"),  # the server's SQLite database lives here
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(params.work_dir / "prefect-results"),
    }
    if "PREFECT_SERVER_API_AUTH_STRING" in env:  # the server asks for it, so our own clients send it
        env.setdefault("PREFECT_API_AUTH_STRING", env["PREFECT_SERVER_API_AUTH_STRING"])
    bin_dir = Path(sys.executable).parent
    services: list[Service] = []
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server_cmd = [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(ports.prefect)]
        services.append(_start("prefect-server", server_cmd, env, folder, url=f"http://{HOST}:{ports.prefect}"))
        _record(folder, services)
        _wait_healthy(f"{api_url}/health", services[0], ready_timeout, lambda: stopping)
        if stopping:
            return 0
        deploy = subprocess.run(
            [sys.executable, "-m", "llmops.cli", "--params", str(params_file), "deploy"],
            env=env,
            capture_output=True,
            text=True,
        )
        if deploy.returncode:
            raise LLMOpsError(f"Registering the deployments failed:\n{deploy.stderr.strip() or deploy.stdout}")
        worker_cmd = [str(bin_dir / "prefect"), "worker", "start", "--pool", params.deploy.work_pool, "--type"]
        services.append(_start("prefect-worker", [*worker_cmd, "process"], env, folder))
        mlflow_cmd = [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", params.tracking.uri]
        mlflow_cmd += ["--host", HOST, "--port", str(ports.mlflow)]
        services.append(_start("mlflow-ui", mlflow_cmd, env, folder, url=f"http://{HOST}:{ports.mlflow}"))
        _record(folder, services)
        print(
            f"Platform up (logs in {folder}):\n"
            f"  Prefect UI  {services[0].url}   (deployments, runs, automations)\n"
            f"  MLflow UI   {services[2].url}   (runs, registry)\n"
            f"  worker      pool {params.deploy.work_pool!r}\n"
            f"  {deploy.stdout.strip().splitlines()[-1]}\n"
            "Stop with Ctrl-C or `make platform-stop`.",
            flush=True,
        )
        while not stopping:
            for service in services:
                if _exited(service.pid):
                    tail = _tail(Path(service.log))
                    raise LLMOpsError(f"{service.name} stopped unexpectedly; its log {service.log} ends with:\n{tail}")
            time.sleep(0.5)
        return 0
    finally:
        _stop(services)
        (folder / STATE_FILE).unlink(missing_ok=True)


def down(params: Params, timeout: float = 30) -> list[str]:
    """Stop the platform the state file names (supervisor first, then any service of ours left); returns the
    names of the services it stopped. Processes that are not the recorded ones are left alone."""
    folder = state_dir(params)
    path = folder / STATE_FILE
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    lock = _take_lock(folder)
    if lock is None:  # a supervisor is alive and holds the lock: it must be the one recorded
        recorded = (state.get("supervisor_started", -1), state.get("supervisor_command", ""))
        supervisor = Identity(state["supervisor"], *recorded)
        if Identity.of(supervisor.pid) != supervisor:
            raise LLMOpsError(
                f"A platform supervisor holds {folder / LOCK_FILE}, but {path} does not name it (pid "
                f"{supervisor.pid} is a different process now). Nothing was signalled; stop the platform with "
                "Ctrl-C in its terminal."
            )
        os.kill(supervisor.pid, signal.SIGTERM)  # it stops its services and removes the state file
        deadline = time.monotonic() + timeout
        while Identity.of(supervisor.pid) == supervisor and time.monotonic() < deadline:
            time.sleep(0.2)
        lock = _take_lock(folder, wait=timeout)
    try:
        services = [Service(**s) for s in state["services"]]
        ours = _forget_strangers(services, path)
        _stop(ours)
        path.unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.close()
    return [s.name for s in ours]


def _start(name: str, argv: list[str], env: dict[str, str], folder: Path, url: str = "") -> Service:
    log_path = folder / f"{name}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops what it started
            preexec_fn=_die_with_parent,
        )
    log.info("started %s (pid %d): %s", name, process.pid, mask_secrets(" ".join(argv)))
    identity = Identity.of(process.pid) or Identity(process.pid, -1, "")
    return Service(name, process.pid, str(log_path), url, started=identity.started, command=identity.command)


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the supervisor dies, however it dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _take_lock(folder: Path, wait: float = 0) -> IO[str] | None:
    """The supervisor's lock, taken (held until the returned file is closed); None if another process holds it."""
    handle = (folder / LOCK_FILE).open("a")
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                return None
            time.sleep(0.2)


def _recorded_supervisor(folder: Path) -> str:
    path = folder / STATE_FILE
    return str(json.loads(path.read_text())["supervisor"]) if path.exists() else "unknown"


def _record(folder: Path, services: list[Service]) -> None:
    me = Identity.of(os.getpid())
    state = {
        "supervisor": os.getpid(),
        "supervisor_started": me.started if me else -1,
        "supervisor_command": me.command if me else "",
        "services": [asdict(s) for s in services],
    }
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(folder / STATE_FILE)


def _clear_stale(folder: Path) -> None:
    """With the lock held (so no supervisor is alive): stop what a crashed platform left, if it is still ours."""
    path = folder / STATE_FILE
    if not path.exists():
        return
    state = json.loads(path.read_text())
    log.warning("Cleaning up after a platform that did not stop cleanly (%s)", path)
    _stop(_forget_strangers([Service(**s) for s in state["services"]], path))
    path.unlink()


def _forget_strangers(services: list[Service], path: Path) -> list[Service]:
    """The recorded services that are still ours; any other process now using a recorded pid is reported and
    never signalled. A service that is gone counts as ours while its process group lives on (its children):
    the kernel does not hand out a pid that still names a process group."""
    ours = []
    for service in services:
        now = Identity.of(service.pid)
        if service.is_ours() or (now is None and _signal_group(service.pid, 0)):
            ours.append(service)
        elif now is not None:
            log.warning(
                "%s names %s as pid %d, but that pid is now another program (%s); it was left alone.",
                path,
                service.name,
                service.pid,
                mask_secrets(now.command)[:200],
            )
    return ours


def _stop(services: list[Service], grace: float = 15) -> None:
    """SIGTERM each service's process group, then SIGKILL whatever is left after `grace` seconds."""
    live = [s for s in services if _signal_group(s.pid, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [s for s in live if not _exited(s.pid)]
        time.sleep(0.2)
    for service in services:
        # Its group may outlive it (a flow run the worker started). The kernel never reuses a pid that still
        # names a process group, so while the leader is gone, whatever is left in that group is its own.
        if service.is_ours() or Identity.of(service.pid) is None:
            _signal_group(service.pid, signal.SIGKILL)
        _exited(service.pid)


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _exited(pid: int) -> bool:
    """True once the process is gone; reaps it when it is our child."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:  # not our child (a stale record): ask the kernel
        return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ")[-1].startswith("Z"))


def _require_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            raise LLMOpsError(
                f"Port {port} on {HOST} is in use by another program. Stop it, or choose other ports: "
                "`make platform PREFECT_PORT=4201 MLFLOW_PORT=5001`."
            ) from None


def _wait_healthy(url: str, service: Service, timeout: float, stopping: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if _exited(service.pid):
            raise LLMOpsError(f"{service.name} failed to start; {service.log} ends with:\n{_tail(Path(service.log))}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    if not stopping():
        raise LLMOpsError(f"{service.name} did not answer {url} within {timeout:.0f}s; see {service.log}.")


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
