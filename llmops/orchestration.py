"""Turning a stage function into a Prefect task, cached on what actually determines its output; and the
stages' log records into the Prefect run that produced them."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from pydantic import BaseModel

from llmops.config import ModelParams

# Code every stage depends on besides its own module: a change here must invalidate every cache.
_SHARED_MODULES = [
    Path(__file__).with_name(name) for name in ("modeling.py", "chat.py", "data.py", "files.py", "training.py")
]


class _InsideARun(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _send_stage_logs_to_prefect() -> None:
    """The stages log with the standard `logging` module (they never import Prefect). Inside a flow or task
    run, their records also go to the run's logs on the Prefect API, so the UI shows them under the task
    that logged them: the training ranks' progress under finetune. Outside a run they only print."""
    handler = APILogHandler()
    handler.addFilter(_InsideARun())
    for name in ("tasks", "llmops"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:  # a flow-run process's root logger passes warnings only
            logger.setLevel(logging.INFO)


_send_stage_logs_to_prefect()


# Where a stage writes, not what it computes from: excluded from the cache key.
_NOT_INPUTS = {"out", "checkpoints"}


def stage_cache_key(context: TaskRunContext, inputs: dict[str, Any]) -> str:
    """Hash of the stage's inputs (except where it writes) and of the code that computes it.

    Inputs that are local folders (a base model, an upstream artifact) are fingerprinted by their files'
    names, sizes and modification times, so a rebuilt model invalidates the cache even at the same path.
    """
    fn = context.task.fn
    digest = hashlib.sha256()
    for source in [Path(inspect.getsourcefile(fn)), *_SHARED_MODULES]:
        digest.update(source.read_bytes())
    payload = {name: _as_path_if_local(value) for name, value in inputs.items() if name not in _NOT_INPUTS}
    digest.update(json.dumps(payload, sort_keys=True, default=_encode).encode())
    return f"{fn.__module__}.{fn.__name__}-{digest.hexdigest()[:32]}"


def _as_path_if_local(value: Any) -> Any:
    """A string naming a local file or folder (a base model path) is fingerprinted like a Path."""
    return Path(value) if isinstance(value, str) and Path(value).exists() else value


def _encode(value: Any) -> Any:
    if isinstance(value, ModelParams):  # a local base model folder is fingerprinted, as when given alone
        return {key: _as_path_if_local(item) for key, item in value.model_dump(mode="json").items()}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return {"path": str(value), "files": _fingerprint(value)}
    return str(value)


def _fingerprint(path: Path) -> list[tuple[str, int, int]]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.exists() else []
    return [(str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def cached_stage(fn: Callable, **options: Any) -> Callable:
    """A Prefect task whose result is persisted and reused while inputs and code are unchanged."""
    return task(fn, name=fn.__name__, cache_key_fn=stage_cache_key, persist_result=True, **options)


def stage(fn: Callable) -> Callable:
    """A Prefect task that always runs (its output depends on state outside its inputs)."""
    return task(fn, name=fn.__name__)
