"""The champion follower: `ChampionFollower` keeps the registry's `champion` alias loaded.

It polls the alias. When it moves (a promotion or a rollback), the new version is downloaded and loaded beside
the one serving, checked to generate, and only then swapped in with one reference assignment. A request holds
the version it started with until it answers, so nothing in flight fails; a version that fails to load is never
swapped in, and the failure shows in `/health`. It reads the registry (`llmops.registry`); it never writes it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.artifacts

from llmops.errors import LLMOpsError
from llmops.registry import CHAMPION, client_for
from llmops.serving.generation import load_generator
from llmops.serving.masking import mask

if TYPE_CHECKING:
    from llmops.config import RegistryParams, TrackingParams
    from llmops.serving.engine import Engine

log = logging.getLogger(__name__)


@dataclass(eq=False)  # one version in memory is itself: compared by identity
class LoadedVersion:
    """One registered version in memory. The HTTP server gives it its `engine` and counts the requests that
    hold it (`requests`), on its event loop only: the tokenizer and the engine are used from that loop alone."""

    model_name: str
    version: str
    model: Any
    tokenizer: Any
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    max_token_chars: int = field(init=False)  # the longest token's characters: the prompt's cheap length bound
    engine: Engine | None = None  # made on first use, on the serving loop (`Server.engine`)
    requests: int = 0  # requests holding this version now
    retired: bool = False  # the champion moved on: no new request takes it; its engine closes when it is free

    def __post_init__(self) -> None:
        self.max_token_chars = max(1, max((len(t) for t in self.tokenizer.get_vocab()), default=1))

    @property
    def name(self) -> str:
        return f"{self.model_name}/{self.version}"


class ChampionFollower:
    """Keeps the registry's `champion` loaded. `current` is swapped in one assignment, so a reader always
    sees a whole version, and one it holds stays usable until it lets go."""

    def __init__(self, tracking: TrackingParams, registry: RegistryParams, cache_dir: Path, poll_seconds: float):
        self.tracking, self.registry, self.cache_dir, self.poll_seconds = tracking, registry, cache_dir, poll_seconds
        self.current: LoadedVersion | None = None
        self.loading: str | None = None
        self.failed: dict[str, dict[str, Any]] = {}  # version -> {"error", "at"}: why and when it failed to load
        self.retry_seconds = max(60.0, 10 * poll_seconds)  # a failed version is tried again after this long
        self.registry_error: str | None = None
        # Called on the follower's thread with the version just replaced (the HTTP server retires its engine).
        self.on_swap: Callable[[LoadedVersion], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def champion(self) -> str | None:
        """The version the alias points at now, or None when there is no champion."""
        from mlflow.exceptions import MlflowException

        try:
            version = client_for(self.tracking).get_model_version_by_alias(self.registry.model_name, CHAMPION)
        except MlflowException as exc:
            if "not found" in str(exc).lower() or "RESOURCE_DOES_NOT_EXIST" in str(exc):
                return None
            raise
        return str(version.version)

    def check_once(self) -> None:
        """One poll: if the alias moved to a version not yet tried, load it and switch to it."""
        try:
            version = self.champion()
            self.registry_error = None
        except Exception as exc:  # an unreachable registry must not stop serving the loaded version
            self.registry_error = mask(f"{type(exc).__name__}: {exc}")  # a URI in it may carry a password
            log.warning("cannot read the champion alias, still serving %s: %s", self._serving(), self.registry_error)
            return
        if version is None or (self.current and self.current.version == version):
            return
        if version in self.failed and time.time() - self.failed[version]["at"] < self.retry_seconds:
            return
        self.loading = version
        start = time.perf_counter()
        try:
            model, tokenizer = load_generator(self._download(version))
        except Exception as exc:
            self.failed[version] = {"error": mask(f"{type(exc).__name__}: {exc}"), "at": time.time()}
            log.error(
                "version %s of %s failed to load and is not served (still serving %s; retried in %gs): %s",
                version,
                self.registry.model_name,
                self._serving(),
                self.retry_seconds,
                self.failed[version]["error"],
            )
            return
        finally:
            self.loading = None
        self.failed.pop(version, None)
        loaded = LoadedVersion(self.registry.model_name, version, model, tokenizer, time.perf_counter() - start)
        previous, self.current = self.current, loaded
        log.info(
            "now serving %s (loaded in %.1fs; was %s)",
            loaded.name,
            loaded.load_seconds,
            previous.name if previous else "nothing",
        )
        if previous is not None and self.on_swap is not None:
            self.on_swap(previous)

    def _serving(self) -> str:
        return self.current.name if self.current else "nothing"

    def _download(self, version: str) -> Path:
        """The version's model folder, downloaded once into the cache (atomically: a crash leaves no half)."""
        dest = self.cache_dir / f"{self.registry.model_name}-v{version}"
        if not dest.exists():
            tmp = dest.with_name(f"{dest.name}.partial-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            mlflow.set_tracking_uri(self.tracking.uri)
            mlflow.artifacts.download_artifacts(f"models:/{self.registry.model_name}/{version}", dst_path=str(tmp))
            tmp.rename(dest)
        configs = sorted(p for p in dest.rglob("config.json") if "code" not in p.relative_to(dest).parts)
        if not configs:
            raise LLMOpsError(f"Version {version} of {self.registry.model_name} holds no model folder (config.json).")
        return configs[0].parent

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.poll_seconds):
                self.check_once()

        self._thread = threading.Thread(target=loop, name="champion-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def health(self) -> dict[str, Any]:
        current = self.current
        return {
            "status": "ok" if current else "no_model",
            "model": current.name if current else None,
            "version": current.version if current else None,
            "load_seconds": round(current.load_seconds, 3) if current else None,
            "loading": self.loading,
            "failed_versions": {
                v: {"error": f["error"], "at": datetime.fromtimestamp(f["at"], UTC).isoformat(timespec="seconds")}
                for v, f in dict(self.failed).items()
            },
            "registry_error": self.registry_error,
            "poll_seconds": self.poll_seconds,
        }
