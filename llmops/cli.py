"""`llmops`: the command line. Exit codes: 0 success (a rejected candidate included), 1 a check failed,
2 bad input or usage. Errors are one paragraph naming the problem and the fix; `--json` prints one JSON
object on the last line of stdout."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops import console
from llmops.config import DEFAULT_PARAMS, Params, load_params, parse_overrides
from llmops.data import dvc_root, track
from llmops.errors import LLMOpsError
from llmops.files import mask_secrets

# Commands whose library output (Great Expectations, DVC, Prefect, transformers) goes to a log file of their
# own: the terminal gets what a person needs. `run` captures its own (its log moves into the run's folder);
# `serve` and `platform` run until stopped, their logs are their output.
QUIET = {"bootstrap", "validate", "ingest", "lineage", "reproduce", "drift", "deploy", "status", "rollback"}


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (the console script exits with it)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    for handler in logging.getLogger().handlers:
        handler.addFilter(_no_traceback_for_user_errors)
    try:
        code = _quietly(args) if args.name in QUIET else args.command(args)
    except LLMOpsError as exc:
        code = _fail(str(exc), exc.exit_code, args)
    except KeyboardInterrupt:
        code = _fail("Interrupted. The champion was not changed.", 130, args)
    except Exception as exc:  # a crash: say so plainly; the log has the detail
        if os.environ.get("LLMOPS_DEBUG"):
            raise
        aftermath = (
            " The champion was not changed, and the MLflow run is marked FAILED with the failing stage."
            if args.name in ("run", "reproduce")
            else ""
        )
        where = f" The full log is {console.log_file()}." if console.log_file() else ""
        message = f"`llmops {args.name}` failed: {type(exc).__name__}: {mask_secrets(str(exc))}.{aftermath}{where}"
        code = _fail(message + " Set LLMOPS_DEBUG=1 to see the traceback.", 1, args)
    if getattr(args, "captured", False) and console.log_file():
        print(f"full log: {console.log_file()}", file=sys.stderr)  # stderr: a --json line stays stdout's last
    return code


def _quietly(args: argparse.Namespace) -> int:
    """Run the command with everything but its own output in `<work_dir>/logs/<command>-*.log` (named at the
    end by `main`; a log left empty is removed)."""
    params = load_params(args.params)  # fails fast, before anything is redirected
    args.captured = not args.verbose
    with (
        console.capture(params.work_dir, verbose=args.verbose, name=args.name) as terminal,
        contextlib.redirect_stdout(terminal.out),  # the command's own print()s, to the terminal
    ):
        return args.command(args)


def _no_traceback_for_user_errors(record: logging.LogRecord) -> bool:
    """Prefect logs a failed task with its traceback; for a problem the user can fix, the message is enough.
    (Only the terminal is spared: the Prefect API keeps the full record.)"""
    if record.exc_info and isinstance(record.exc_info[1], LLMOpsError):
        record.exc_info = record.exc_text = None
    return True


def _fail(message: str, code: int, args: argparse.Namespace) -> int:
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit_code": code, "error": message}))
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmops", description=__doc__.split(".")[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=handler, name=name)
        # Also after the subcommand; SUPPRESS keeps the value given before it when this one is absent.
        sub.add_argument("--params", type=Path, default=argparse.SUPPRESS, help="params file (default params.yaml)")
        if json_flag:
            sub.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        if name in QUIET or name == "run":
            sub.add_argument(
                "-v",
                "--verbose",
                action="store_true",
                help="show every library's output on the terminal (otherwise it goes to a log file, named at the end)",
            )
        return sub

    boot = command("bootstrap", cmd_bootstrap, "build the default tiny base model and demo dataset", False)
    boot.add_argument("--force", action="store_true", help="rebuild even if they exist")
    boot.add_argument("--drifted-batch", type=Path, metavar="FILE", help="also write an example drifted batch here")
    run = command("run", cmd_run, "run the retrain flow once")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml value for this run, e.g. finetune.learning_rate=1e-3",
    )
    run.add_argument("--reason", default="manual", help="why this run happens (recorded as lineage)")
    validate = command("validate", cmd_validate, "clean and check a dataset split; exit 1 if it is invalid")
    validate.add_argument(
        "--data", type=Path, required=True, help="a JSONL file, or a folder of them (each in any accepted shape)"
    )
    validate.add_argument("--against", type=Path, help="an eval split to check the split's prompts for leakage into")
    ingest = command("ingest", cmd_ingest, "validate new rows, fold them into the training set, version it")
    ingest.add_argument(
        "--data", type=Path, required=True, help="JSONL file of new rows, or a folder of them and/or a traffic log"
    )
    ingest.add_argument("--mode", choices=["append", "replace"], default="append")
    lineage = command("lineage", cmd_lineage, "where a registered version came from")
    lineage.add_argument("version", help="registered model version number")
    reproduce = command("reproduce", cmd_reproduce, "re-run on exactly the data and params of a version, compare")
    reproduce.add_argument("version", help="registered model version number")
    drift = command("drift", cmd_drift, "check incoming data for drift; on drift emit the event (exit 1)")
    drift.add_argument(
        "--data", type=Path, help="JSONL file, or folder of them and/or a traffic log (default: monitor.incoming)"
    )
    command("deploy", cmd_deploy, "register the deployments and drift automation on PREFECT_API_URL")
    platform = command("platform", cmd_platform, "run the platform on this machine (make platform)", False)
    platform.add_argument("action", choices=["up", "down"], help="up: start and supervise; down: stop it")
    platform.add_argument("--port", type=int, default=4200, help="Prefect server port (default 4200)")
    platform.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default 5000)")
    serve = command("serve", cmd_serve, "serve the champion over an OpenAI-style HTTP API, following the alias", False)
    serve.add_argument("--host", help="address to bind (default serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    command("status", cmd_status, "show the current champion")
    rollback = command("rollback", cmd_rollback, "move champion back to the previous champion")
    rollback.add_argument("--reason", default="manual rollback", help="recorded in the champion history")
    return parser


def _prepare_prefect(params: Params) -> None:
    """Defaults for the embedded setup; any PREFECT_* variable the user set wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary API server gets 20 s to start by default: too little on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(params.work_dir / "prefect-results"))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """For a block that imports the flow's libraries: their millions of objects live until exit, and the
    cyclic collector would sweep them over and over as they arrive (about a second of a cached rerun)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _start_prefect_server() -> Callable[[], None]:
    """With no PREFECT_API_URL, Prefect starts a temporary API server as the flow begins, and waits seconds
    for it to answer. Start that same server now, in the background: it boots in its own process while this
    one imports the flow's modules, and the flow's client finds it running. Returns the wait for it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None  # a real server: nothing to start
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow's client starts it again and reports what fails
            logging.getLogger(__name__).debug("early start of Prefect's temporary server failed", exc_info=True)

    starting = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    starting.start()
    return starting.join


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from tasks.bootstrap import build_base_model, build_demo_dataset, build_incoming_batch, move_to_split_folders

    params = load_params(args.params)
    model_dir = Path(params.model.base)
    if args.force or not (model_dir / "config.json").exists():
        build_base_model(params.bootstrap, model_dir)
        print(f"built base model: {model_dir}")
    else:
        print(f"base model present: {model_dir}")
    data_dir = params.data.train.parent
    if not args.force and move_to_split_folders(data_dir):
        print(f"demo dataset moved into split folders: {params.data.train}/, {params.data.eval}/")
    if args.force or not (params.data.train.exists() and params.data.eval.exists()):
        build_demo_dataset(params.bootstrap, data_dir)
        print(f"built demo dataset: {data_dir}")
    else:
        print(f"demo dataset present: {data_dir}")
    if dvc_root(data_dir):
        print(f"demo dataset versioned with DVC: {track(data_dir)}")
    if args.drifted_batch:
        build_incoming_batch(params.bootstrap, args.drifted_batch, drifted=True)
        print(f"example drifted batch: {args.drifted_batch} (check it: llmops drift --data {args.drifted_batch})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    params = load_params(args.params, overrides)  # fail fast on bad params, before Prefect starts
    _prepare_prefect(params)
    with console.capture(params.work_dir, verbose=args.verbose) as terminal:
        where = "this terminal (-v)" if args.verbose else "the run's log file, named at the end"
        print(f"llmops run: library output goes to {where}", file=terminal.err, flush=True)
        # At exit the collector would sweep every object torch, transformers, GX and Prefect made (seconds
        # after the answer is printed) only for the memory to go back with the process: freeze them instead.
        # Every other exit step (atexit handlers, flushing, logging) runs as usual.
        atexit.register(gc.freeze)
        with _collector_paused():
            server_started = _start_prefect_server()
            from flows.retrain import retrain

        server_started()
        summary = retrain(params_file=str(args.params), overrides=overrides, reason=args.reason)
    if args.json:
        print(json.dumps({"ok": True, **summary.model_dump(mode="json")}))
        return 0
    _print_summary(summary, params)
    return 0


def _print_summary(summary: Any, params: Params) -> None:
    if summary.ingest and summary.ingest.traffic:
        print(f"\nServed traffic: {summary.ingest.traffic.summary()}")
    data = summary.dataset
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(data.dropped.items())) or "none"
    print(f"\nData: {data.train_rows} training and {data.eval_rows} eval conversations; dropped: {dropped}")
    p = summary.promotion
    if p.unchanged:
        print(
            f"\nUnchanged: the candidate is bit-identical to champion {p.model_name} version {p.version} "
            "(same model files): nothing evaluated, nothing registered."
        )
    else:
        print("\nGate")
        print(f"  {'check':<26} {'candidate':>10} {'reference':>10}  {'threshold':<22} result")
        for c in summary.decision.checks:
            reference = "" if c.reference is None else f"{c.reference:.4f}"
            verdict = "pass" if c.passed else "FAIL"
            print(f"  {c.name:<26} {c.candidate:>10.4f} {reference:>10}  {c.threshold:<22} {verdict}")
        verdict = "promoted" if p.alias == "champion" else "not promoted: " + "; ".join(summary.decision.reasons)
        print(f"\nRegistry: {p.model_name} version {p.version} -> alias '{p.alias}' ({verdict})")
    print(f"MLflow run: {summary.mlflow_run_id}" + (f"   full log: {console.log_file()}" if console.log_file() else ""))
    print(
        f"Open the MLflow UI on this run: make mlflow-ui   (or: mlflow ui --backend-store-uri "
        f"{mask_secrets(params.tracking.uri)}), then http://127.0.0.1:5000"
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from llmops.chat import load_chat_template
    from tasks.validate import check_split

    params = load_params(args.params)
    report = check_split(
        params.validate_,
        params.model.base,
        params.finetune.max_seq_len,
        args.data,
        args.against,
        excess_length=params.data.excess_length,
        chat_template=load_chat_template(params.data.chat_template),
    )
    if args.json:
        summary = {"ok": report.ok, "verdict": report.verdict, "dropped_rows": report.dropped_rows}
        print(json.dumps({**summary, "problems": report.problems(), **report.model_dump(mode="json")}))
    else:
        print(
            f"{args.data}: {report.format or 'no known'} format, {report.rows_read} rows read, {report.rows} kept, "
            f"{'valid' if report.ok else 'INVALID'}"
        )
        for line in report.cleaning_lines():
            print(f"  {line}")
        for problem in report.problems():
            print(f"  - {problem}")
    return 0 if report.ok else 1


def cmd_ingest(args: argparse.Namespace) -> int:
    from tasks.ingest import ingest_dataset

    params = load_params(args.params)
    result = ingest_dataset(
        params.validate_,
        params.model.base,
        params.finetune.max_seq_len,
        args.data,
        params.data.train,
        params.data.eval,
        args.mode,
        excess_length=params.data.excess_length,
        chat_template=params.data.chat_template,
        loop=params.loop,
    )
    if args.json:
        print(json.dumps({"ok": True, **result.model_dump(mode="json")}))
    else:
        print(f"{result.dataset}: {args.mode} {args.data} -> {result.rows_before} -> {result.rows_after} training rows")
        if result.traffic:
            print(f"  traffic {result.traffic.log}: {result.traffic.summary()}")
        if result.version == result.previous_version:
            print("  nothing new to fold in: the dataset is unchanged")
        else:
            print(f"  version {result.previous_version} -> {result.version} (dvc add + push done)")
        print("  commit the updated .dvc file, then `llmops run` retrains on it")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from llmops import registry

    params = load_params(args.params)
    lineage = registry.describe_version(params.tracking, params.registry, args.version)
    if args.json:
        print(json.dumps({"ok": True, **lineage}, default=str))
        return 0
    print(f"{lineage['model']} version {lineage['version']} {lineage['aliases'] or ''}")
    for key in ("version", "train", "train_rows", "eval", "eval_rows", "dvc_file", "validation"):
        print(f"  dataset {key:<11} {lineage['dataset'].get(key, '')}")
    print(f"  git commit        {lineage['git_commit']}")
    print(f"  params hash       {lineage['params_hash']}  (full params: MLflow run artifact params.json)")
    gate = lineage["gate"]
    print(f"  gate              {'passed' if gate and gate['passed'] else 'rejected'}")
    print(f"  prefect flow run  {lineage['prefect_flow_run_id']}")
    print(f"  mlflow run        {lineage['mlflow_run_id']}  (reason: {lineage['reason']})")
    if lineage["restore_data"]:
        print("  get this exact data back:")
        for line in lineage["restore_data"]:
            print(f"    {line}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    _prepare_prefect(params)
    from flows.reproduce import reproduce

    result = reproduce(version=args.version, params_file=str(args.params))
    if args.json:
        print(json.dumps({"ok": True, **result.model_dump(mode="json")}))
        return 0
    print(
        f"version {result.version} reproduced on dataset {result.dataset_version} (MLflow run {result.mlflow_run_id})"
    )
    print(f"  {'metric':<16} {'original':>10} {'reproduced':>11} {'difference':>11}")
    for m in result.metrics:
        print(f"  {m.metric:<16} {m.original:>10.4f} {m.reproduced:>11.4f} {m.difference:>+11.4f}")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    _prepare_prefect(params)
    from flows.monitor import monitor

    reports = monitor(params_file=str(args.params), incoming=str(args.data) if args.data else None)
    drifted = any(report.drifted for report in reports)
    if args.json:
        print(json.dumps({"ok": True, "drifted": drifted, "reports": [r.model_dump(mode="json") for r in reports]}))
    elif not reports:
        folder = args.data or params.monitor.incoming
        print(f"Nothing to check in {folder}: no batch files, and no traffic the champion has served.")
    else:
        print("\n\n".join(report.to_markdown() for report in reports))
        if drifted:
            folder = args.data or params.monitor.incoming
            print(f"\nEvent llmops.drift.detected emitted: on the platform, a retrain folds {folder} in.")
    return 1 if drifted else 0


def cmd_deploy(args: argparse.Namespace) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        raise LLMOpsError(
            "PREFECT_API_URL is not set: deployments need a Prefect server. Start one with `make platform` "
            "(which registers them itself), or point at your team's: PREFECT_API_URL=https://.../api."
        )
    from deployments import register

    registered = register(args.params)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "work_pool": registered.work_pool,
                    "retrain": str(registered.retrain),
                    "monitor": str(registered.monitor),
                }
            )
        )
    else:
        print(
            f"deployments retrain/retrain and monitor/monitor, automation retrain-on-drift: registered on "
            f"{os.environ['PREFECT_API_URL']} (work pool {registered.work_pool!r})"
        )
    return 0


def cmd_platform(args: argparse.Namespace) -> int:
    from llmops import platform

    params = load_params(args.params)
    if args.action == "down":
        stopped = platform.down(params)
        print(f"stopped: {', '.join(stopped)}" if stopped else "The platform is not running.")
        return 0
    return platform.up(params, args.params, platform.Ports(prefect=args.port, mlflow=args.mlflow_port))


def cmd_status(args: argparse.Namespace) -> int:
    from llmops import registry

    params = load_params(args.params)
    champion = registry.describe_champion(params.tracking, params.registry)
    if args.json:
        print(json.dumps({"ok": True, "champion": champion}))
        return 0
    if champion is None:
        print(f"No champion yet for {params.registry.model_name!r}: run `llmops run` (or `make demo`).")
        return 0
    print(f"{champion['model']} champion: version {champion['version']} (registered {champion['registered_at']})")
    print(f"  why: {champion['reason']}")
    for key, value in champion["metrics"].items():
        print(f"  {key:<20} {value:.4f}")
    for key, value in champion["lineage"].items():
        print(f"  {key.removeprefix('lineage.'):<20} {value}")
    print("  history:")
    for event in champion["history"]:
        print(f"    {event['at']}  {event['event']:<8} v{event['version']}  by {event['by']}: {event['reason']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from llmops import registry

    params = load_params(args.params)
    old, new = registry.rollback(params.tracking, params.registry, args.reason)
    if args.json:
        print(json.dumps({"ok": True, "from_version": old, "to_version": new}))
    else:
        print(f"{params.registry.model_name}: champion moved back from version {old} to version {new}.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from llmops.serving.app import serve

    params = load_params(args.params)
    api_key = os.environ.get("LLMOPS_SERVE_API_KEY") or None
    host = args.host or params.serve.host
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("llmops.serving.app").warning(
            "serving on %s without an API key: anyone who can reach it may query the model "
            "(set LLMOPS_SERVE_API_KEY to require `Authorization: Bearer <key>`)",
            host,
        )
    serve(params, api_key, host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
