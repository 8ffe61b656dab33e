"""Serve the champion: an OpenAI-style HTTP API that follows the registry's `champion` alias.

- `ChampionFollower` polls the alias. When it moves (a promotion or a rollback), the new version is
  downloaded and loaded beside the one serving, checked to generate, and only then swapped in with one
  reference assignment. A request holds the version it started with until it answers, so nothing in flight
  fails; a version that fails to load is never swapped in, and the failure shows in `/health`.
- `create_app` is the FastAPI app: `/v1/chat/completions`, `/v1/completions` (whole, or streamed as
  Server-Sent Events while generating), `/v1/models`, `/health`, `/v1/feedback`, with bearer-token access
  (a serving key; a distinct reviewer key for corrections) and bounded admission: body size, prompts, turns
  and prompt tokens are checked before any rendering, at most `serve.max_queue` requests wait for a slot
  (more get 503 with Retry-After), and a request whose client has gone stops generating and frees its slot.
  The handlers are plain functions of a `Server` (what they share); `create_app` only wires them.
- Generation is batched: each loaded version has its `llmops.engine.Engine`, made on the event loop that
  serves, where up to `serve.max_batch` requests share every forward pass. A request holds its version (and
  so its engine) until it answers; when the champion moves, new requests go to the new version's engine and
  the old one is closed once the requests holding it are done (`Server.retire`).
- Each answer is appended, redacted, to the traffic log under the monitor's incoming folder, and feedback
  beside it (`llmops.traffic`), off the event loop: the monitor and the next retrain read them back.
- Nothing the server shows or logs carries a credential (`mask`, `MaskSecrets`).
- `TextGenerator` is the MLflow model logged with each registered version: the same loading and generation
  code, shipped with the model (`code_paths`), so `mlflow models serve` needs no install of this project.

Only this module turns chat messages into model input (`_conversation_prompt`). The server reads the
registry; it never writes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlflow.pyfunc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llmops.chat import render_prompt
from llmops.data import Turn
from llmops.devices import resolve_placement
from llmops.engine import Engine
from llmops.errors import LLMOpsError
from llmops.files import mask_secrets
from llmops.modeling import Generation, generate, load_model, load_tokenizer
from llmops.traffic import TRAFFIC_FOLDER, TrafficLog

if TYPE_CHECKING:
    from llmops.config import Params, RegistryParams, ServeParams, TrackingParams

log = logging.getLogger(__name__)


# --- Model input and generation: shared by `llmops serve` and the registered MLflow model ---------------------


def _conversation_prompt(messages: Sequence[dict[str, str]]) -> list[Turn]:
    """Chat messages as the conversation turns training rendered (`llmops.chat`): the one place they meet."""
    return [Turn(m["role"], m["content"]) for m in messages]


def prompt_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The model input for `messages`, as generation sees it (`llmops.chat.render_prompt`)."""
    return render_prompt(tokenizer, _conversation_prompt(messages))


def reply(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    on_text: Callable[[str], None] | None = None,
) -> list[Generation]:
    """Greedy replies to conversations, stopping at EOS exactly as evaluation does; `on_text` streams the reply
    to a single conversation piece by piece (`llmops.modeling.generate`)."""
    prompts = [_conversation_prompt(c) for c in conversations]
    return generate(model, tokenizer, prompts, max_new_tokens, on_text=on_text)


def load_generator(folder: str | Path):
    """(model, tokenizer) from a model folder, checked to generate: a version that cannot answer fails here."""
    placement = resolve_placement()  # the serving host's own: its GPU in bf16 if it has one, else the CPU
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, dtype=placement.dtype, device=placement.device)
    reply(model, tokenizer, [[{"role": "user", "content": "ping"}]], max_new_tokens=1)
    return model, tokenizer


class TextGenerator(mlflow.pyfunc.PythonModel):
    """The registered model: prompts in, greedy replies out, one per prompt. A prompt is a plain string (one
    user turn), a row with a `prompt` string, or a row with chat `messages`; give one string, a list of any of
    these, or a DataFrame of `prompt`/`messages` columns (`mlflow models serve`: `{"inputs": [...]}` or
    `{"dataframe_records": [...]}`).

    Params: `max_new_tokens` (default 64); `temperature` is accepted for API compatibility, and generation
    is greedy (the decoding the gate judged)."""

    def load_context(self, context) -> None:
        self.model, self.tokenizer = load_generator(context.artifacts["model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        conversations = [_input_conversation(row) for row in _input_rows(model_input)]
        if not conversations:
            raise LLMOpsError(
                'No prompts to answer. Give a string, a list of strings, or rows of {"prompt": "..."} or '
                '{"messages": [{"role": ..., "content": ...}]} (a list of them, or a DataFrame with those columns).'
            )
        return [g.text for g in reply(self.model, self.tokenizer, conversations, max_new_tokens)]


def _input_rows(model_input: Any) -> list[Any]:
    if isinstance(model_input, str | dict):  # one prompt
        return [model_input]
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        return model_input.to_dict(orient="records")
    return list(model_input)  # a list, or the numpy array `mlflow models serve` makes of {"inputs": [...]}


def _plain(value: Any) -> Any:
    """numpy values (as `mlflow models serve` parses JSON) as the plain Python ones they hold."""
    return value.tolist() if hasattr(value, "tolist") else value


def _input_conversation(row: Any) -> list[dict[str, str]]:
    row = _plain(row)
    if isinstance(row, str):
        return [{"role": "user", "content": row}]
    if isinstance(row, dict):
        messages, prompt = _plain(row.get("messages")), _plain(row.get("prompt", row.get(0)))
        if isinstance(messages, list) and messages:
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
    raise LLMOpsError(f"A prompt is a string, or a row with a `prompt` string or chat `messages`; got {row!r}.")


def model_signature():
    """No input schema, on purpose: MLflow drops whatever matches no column of a column schema (a plain list of
    strings would reach `predict` as no rows at all), so the input reaches `TextGenerator.predict` as sent and
    is checked there. Output: one string per prompt; params max_new_tokens, temperature."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)]),
    )


# --- Following the champion ----------------------------------------------------------------------------------


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

        from llmops.tracking import CHAMPION, client_for

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


# --- Masking: nothing the server shows or logs carries a credential ------------------------------------------

# Tokens of common providers, and bearer tokens, wherever they appear (URI passwords: `mask_secrets`).
_TOKENS = re.compile(
    r"(?P<keep>\bBearer\s+)[^\s\"',]+"
    r"|\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|xox[abpr]-[A-Za-z0-9-]{10,})"
)
_SERVER_LOGGERS = ("llmops.serve", "llmops.traffic", "llmops.modeling", "uvicorn", "uvicorn.error", "uvicorn.access")


def mask(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` without credentials: URI passwords (`postgresql://u:***@host`), `?password=` values, bearer and
    provider tokens, and the given `secrets` (the server's own keys) wherever they appear."""
    text = _TOKENS.sub(lambda m: f"{m.group('keep')}***" if m.group("keep") else "***", mask_secrets(text))
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class MaskSecrets(logging.Filter):
    """Masks every record of the logger it is on (`mask`): its message, arguments and traceback."""

    def __init__(self, secrets: Sequence[str] = ()):
        super().__init__("mask-secrets")
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        # Arguments are masked one by one, not merged into the message: formatters such as uvicorn's access log
        # read them. Numbers stay numbers (for %d); anything else becomes its masked text.
        def masked(value: Any) -> Any:
            return value if isinstance(value, int | float) else mask(str(value), self.secrets)

        if isinstance(record.msg, str):
            record.msg = mask(record.msg, self.secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(masked(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: masked(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text, self.secrets)
        return True


def mask_server_logs(secrets: Sequence[str] = ()) -> None:
    """Put `MaskSecrets` on each of the server's loggers (a logger's filters see only its own records)."""
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, MaskSecrets)]:
            logger.removeFilter(old)
        logger.addFilter(MaskSecrets(secrets))


# --- The HTTP API: errors, schemas, limits -------------------------------------------------------------------


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.retry_after = status, message, kind, param, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def crashed(cls, exc: Exception) -> APIError:
        message = f"The server failed on this request ({type(exc).__name__}); its log has the details."
        return cls(500, message, "server_error")


class _ClientGone(Exception):
    """The client of a non-streamed request went away: its generation was cancelled and its slot freed."""


def _finish_reason(generation: Generation) -> str:
    return "stop" if generation.stopped_at_eos else "length"


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    n: int = 1
    stream: bool = False


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class Feedback(BaseModel):
    id: str = Field(max_length=200)
    rating: Literal["up", "down"] | None = None
    correction: str | None = None  # the reviewer's answer; needs the reviewer key
    user: str | None = Field(None, max_length=200)  # the end user the client answered, as OpenAI's `user`


def key_hash(key: str) -> str:
    """Who sent a judgment, without the key: the first 12 hex digits of its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Keys:
    """The serving key (inference, ratings, /health, /docs) and the reviewer key (also corrections)."""

    serving: str | None
    reviewer: str | None

    def given(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None

    @staticmethod
    def _is(given: str | None, key: str | None) -> bool:  # constant time: a key cannot be guessed byte by byte
        return given is not None and key is not None and hmac.compare_digest(given.encode(), key.encode())

    def require_serving(self, request: Request) -> None:
        if self.serving is not None and not self._is(self.given(request), self.serving):
            raise APIError(401, "Missing or wrong API key: send `Authorization: Bearer <key>`.", "authentication_error")

    def judge(self, request: Request) -> tuple[Literal["reviewer", "user"], str | None]:
        """(role, key hash) of whoever sends feedback: the reviewer key, else the serving key (or no key, when
        the server has none). Anything else is a 401."""
        given = self.given(request)
        if self._is(given, self.reviewer):
            return "reviewer", key_hash(given)
        self.require_serving(request)
        return "user", key_hash(given) if given else None

    def forbid_correction(self, request: Request) -> APIError:
        """Why a correction from this caller (not a reviewer) is refused: 401 with no key, else 403."""
        how = "send `Authorization: Bearer <reviewer key>` (the server's LLMOPS_REVIEWER_API_KEY)"
        if self.reviewer is None:
            return APIError(
                403,
                "Corrections are off on this server: it has no reviewer key. A correction becomes training data, "
                "so only a reviewer may write one; start the server with LLMOPS_REVIEWER_API_KEY set. "
                "Ratings are accepted with the serving key.",
                "permission_error",
                param="correction",
            )
        if self.given(request) is None:
            return APIError(401, f"A correction needs the reviewer key: {how}.", "authentication_error", "correction")
        return APIError(
            403,
            f"This key may rate answers but not correct them: a correction becomes training data, so it needs the "
            f"reviewer key; {how}. Send the rating without `correction` to rate with this key.",
            "permission_error",
            param="correction",
        )


class Admission:
    """At most `max_queue` requests wait for a generation slot beside the `max_batch` generating; more get a 503
    with Retry-After. A request counts from its admission to its answer, one place per prompt: those beyond
    `max_batch` are the ones waiting, whether still before the engine or in its queue (`Engine.waiting`). Used
    on the event loop only, so a plain counter is enough."""

    def __init__(self, max_queue: int, max_batch: int = 1):
        self.max_queue, self.max_batch, self.in_flight = max_queue, max_batch, 0

    def enter(self, places: int = 1) -> Callable[[], None]:
        """Take `places` (one per prompt), or raise the 503; returns the function that gives them back (once)."""
        waiting = max(0, self.in_flight - self.max_batch)
        if self.in_flight >= self.max_batch and waiting >= self.max_queue:
            raise APIError(
                503,
                f"The server is busy: {waiting} requests are already waiting for generation "
                f"(serve.max_queue is {self.max_queue}). Retry after the time in the Retry-After header.",
                "server_busy",
                retry_after=1,
            )
        self.in_flight += places
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= places

        return release


class RateLimit:
    """At most `per_minute` calls per key in any 60 seconds (a sliding window). Keys seen are bounded: the
    least recent is forgotten first."""

    def __init__(self, per_minute: int, max_keys: int = 10_000):
        self.per_minute, self.max_keys = per_minute, max_keys
        self.calls: OrderedDict[str, deque[float]] = OrderedDict()

    def check(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        calls = self.calls.pop(key, None) or deque()
        while calls and calls[0] <= now - 60:
            calls.popleft()
        self.calls[key] = calls
        if len(self.calls) > self.max_keys:
            self.calls.popitem(last=False)
        if len(calls) >= self.per_minute:
            wait = max(1, math.ceil(calls[0] + 60 - now))
            raise APIError(
                429,
                f"Too much feedback from this key: serve.feedback_per_minute is {self.per_minute}. "
                f"Retry in {wait} s (the Retry-After header).",
                "rate_limit_error",
                retry_after=wait,
            )
        calls.append(now)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413, whether it declares its length or is sent
    in chunks with none (bytes are counted as they arrive, and reading stops at the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> APIError:
        return APIError(
            413,
            f"The request body is over this server's limit of {self.max_bytes} bytes (serve.max_body_bytes). "
            "Send less: shorter messages, or fewer prompts per request.",
            param="body",
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large().response()(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # raised inside the app's body read: its handlers answer the 413
                    raise HTTPException(413, self.too_large().message)
            return message

        await self.app(scope, counted, send)


def check_turns(conversation: list[dict[str, str]], settings: ServeParams) -> None:
    if len(conversation) > settings.max_turns:
        raise APIError(
            400,
            f"The conversation has {len(conversation)} messages, over this server's limit of {settings.max_turns} "
            "(serve.max_turns). Send fewer turns (drop or summarize the oldest).",
            param="messages",
        )


def check_prompt_chars(loaded: LoadedVersion, conversations: list[list[dict[str, str]]], settings) -> None:
    """The cheap bound, before any tokenizing or rendering: no token of this tokenizer is longer than
    `loaded.max_token_chars`, so more characters than `max_prompt_tokens` such tokens hold is surely too long."""
    bound = settings.max_prompt_tokens * loaded.max_token_chars
    for conversation in conversations:
        chars = sum(len(m["content"]) for m in conversation)
        if chars > bound:
            raise APIError(
                400,
                f"The prompt is {chars} characters: more than {settings.max_prompt_tokens} tokens, this server's "
                f"limit (serve.max_prompt_tokens), can hold. Shorten it.",
                param="messages",
            )


def check_prompt_tokens(loaded: LoadedVersion, conversations: list[list[dict[str, str]]], settings) -> list[list[int]]:
    """Each conversation's prompt ids, rendered once (after the cheap `check_prompt_chars`): generation takes
    these very ids. A prompt over the limit is a 400. On the event loop, as every use of the tokenizer."""
    prompts = [prompt_ids(loaded.tokenizer, c) for c in conversations]
    for ids in prompts:
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(
                400,
                f"The prompt is {len(ids)} tokens, over this server's limit of {settings.max_prompt_tokens} "
                "(serve.max_prompt_tokens). Shorten it.",
                param="messages",
            )
    return prompts


async def whole_answer(engine: Engine, ids: list[int], max_new_tokens: int) -> Generation:
    """The engine's answer to one prompt. Cancelling the task that awaits it cancels the request in the engine
    and frees its slot (`aclosing` closes the generation at once, not when it is collected)."""
    async with aclosing(engine.generate(ids, max_new_tokens)) as pieces:
        async for item in pieces:
            if isinstance(item, Generation):
                return item
    raise LLMOpsError("The engine's generation ended without an answer.")


def usage_of(loaded: LoadedVersion, prompts: list[list[int]], generations: list[Generation]) -> dict[str, int]:
    completion = [len(loaded.tokenizer(g.text, add_special_tokens=False)["input_ids"]) for g in generations]
    usage = {"prompt_tokens": sum(len(ids) for ids in prompts), "completion_tokens": sum(completion)}
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


class _HeldStream(StreamingResponse):
    """A streamed answer that gives its admission place and its version back however it ends (done, failed,
    or cut off)."""

    def __init__(self, content, release: Callable[[], None], pieces: AsyncIterator | None = None):
        super().__init__(content, media_type="text/event-stream")
        self.release, self.pieces = release, pieces

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                if self.pieces is not None:  # a stream cut off between pieces: its engine request ends now
                    await self.pieces.aclose()
            finally:
                self.release()


# --- The HTTP API: handlers ----------------------------------------------------------------------------------


@dataclass
class Server:
    """What the handlers share: the champion, the limits, the keys, the traffic log, and the event loop that
    serves. Generation runs in each version's engine (`Server.engine`); everything else that touches the model's
    tokenizer (rendering a prompt, counting an answer's tokens) runs on that loop, so one thread uses it."""

    follower: ChampionFollower
    settings: ServeParams
    keys: Keys
    traffic: TrafficLog | None
    admission: Admission = field(init=False)
    feedback_rate: RateLimit = field(init=False)
    loop: asyncio.AbstractEventLoop | None = None  # set as the app starts (its lifespan)
    close_seconds: float = 300.0  # a retired engine's requests get this long to finish before they are cancelled
    retired: list[LoadedVersion] = field(default_factory=list)  # versions whose engine is still to close

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.max_queue, self.settings.max_batch)
        self.feedback_rate = RateLimit(self.settings.feedback_per_minute)

    def serving(self) -> LoadedVersion:
        current = self.follower.current  # held for the whole request: a switch meanwhile does not affect it
        if current is None:
            name = self.follower.registry.model_name
            raise APIError(503, f"No champion of {name} is loaded yet; see /health.", "unavailable", retry_after=5)
        return current

    def engine(self, loaded: LoadedVersion) -> Engine:
        """The version's engine, made on first use, on this (the serving) loop: its queues and slots live there."""
        if loaded.engine is None:
            loaded.engine = Engine(
                loaded.model,
                loaded.tokenizer,
                max_batch=self.settings.max_batch,
                max_tokens=self.settings.max_prompt_tokens + self.settings.max_tokens,
            )
            log.info("%s: generating up to %d requests together", loaded.name, self.settings.max_batch)
        return loaded.engine

    def hold(self, loaded: LoadedVersion) -> Callable[[], None]:
        """Count a request on `loaded` until the returned function is called (once): a retired version's engine
        closes when the last request holding it lets go."""
        loaded.requests += 1
        held = True

        def let_go() -> None:
            nonlocal held
            if held:
                held = False
                loaded.requests -= 1
                if loaded.retired and loaded.requests == 0:
                    asyncio.ensure_future(self.close_engine(loaded, 0))

        return let_go

    def retire_soon(self, previous: LoadedVersion) -> None:
        """From the follower's thread, when the champion moved: retire `previous` on the serving loop."""
        if self.loop is not None and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.retire(previous), self.loop)

    async def retire(self, previous: LoadedVersion) -> None:
        """No new request takes `previous` (the follower already serves another); its engine closes once the
        requests holding it are done, or after `close_seconds` (what is left then is cancelled)."""
        previous.retired = True
        self.retired.append(previous)
        if previous.requests == 0:
            await self.close_engine(previous, 0)
            return
        deadline = time.monotonic() + self.close_seconds
        while previous.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.close_engine(previous, 0)

    async def close_engine(self, loaded: LoadedVersion, timeout: float | None) -> None:
        if loaded in self.retired:
            self.retired.remove(loaded)
        engine, loaded.engine = loaded.engine, None
        if engine is not None and not engine.closed:
            await engine.close(timeout)
            log.info("%s: its engine is closed", loaded.name)

    def budget(self, body: Sampling) -> int:
        """New tokens to generate for `body`; rejects what this server does not do."""
        if body.n != 1:
            raise APIError(400, f"n={body.n}: this server returns one choice per request; send n: 1.", param="n")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > self.settings.max_tokens:
            raise APIError(
                400,
                f"max_tokens {asked} is over this server's limit of {self.settings.max_tokens} (serve.max_tokens).",
                param="max_tokens",
            )
        return asked or self.settings.default_max_tokens

    async def record(self, answer_id: str, conversation, text: str, loaded: LoadedVersion, start: float, now) -> None:
        """Log one answer; redaction and the file write run on a worker thread, never on the event loop."""
        if self.traffic is not None:
            latency_ms = round((time.perf_counter() - start) * 1000, 2)
            facts = {"model": loaded.name, "version": loaded.version, "latency_ms": latency_ms}
            timestamp = now.isoformat(timespec="milliseconds")
            await run_in_threadpool(self.traffic.append, answer_id, conversation, text, **facts, timestamp=timestamp)

    async def answer(
        self, request: Request, loaded: LoadedVersion, conversations: list[list[dict[str, str]]], max_new_tokens: int
    ) -> tuple[list[Generation], dict[str, int]]:
        """Generate, holding an admission place per prompt until the answers are done or the client has gone.
        The prompts go to the engine together, so they share forward passes. A client that goes is noticed
        within a tenth of a second: its requests are cancelled and their slots and places given back at once."""
        release, let_go = self.admission.enter(len(conversations)), self.hold(loaded)
        try:
            prompts = check_prompt_tokens(loaded, conversations, self.settings)
            engine = self.engine(loaded)
            job = asyncio.ensure_future(asyncio.gather(*(whole_answer(engine, i, max_new_tokens) for i in prompts)))
            watch = asyncio.ensure_future(_watch_disconnect(request))
            try:
                await asyncio.wait([job, watch], return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
                if not job.done():  # the client went away (or this handler was cancelled): stop its generation
                    job.cancel()
            if job.cancelled() or not job.done():
                await asyncio.wait([job])  # its requests are cancelled in the engine, their slots free
                log.info("the client went away; its generation stopped and its place was given back")
                raise _ClientGone
            generations = job.result()
            return generations, usage_of(loaded, prompts, generations)
        finally:
            release()
            let_go()

    async def stream(
        self,
        loaded: LoadedVersion,
        conversation: list[dict[str, str]],
        max_new_tokens: int,
        chunks: Callable[[AsyncIterator[str | Generation]], AsyncIterator[dict[str, Any]]],
        response_id: str,
        start: float,
        now: datetime,
    ) -> StreamingResponse:
        """The answer streamed; it holds an admission place from before its prompt is counted (a 400 before the
        stream starts when too long) to the stream's end."""
        release, let_go = self.admission.enter(), self.hold(loaded)
        try:
            [ids] = check_prompt_tokens(loaded, [conversation], self.settings)
            engine = self.engine(loaded)
        except BaseException:
            release()
            let_go()
            raise
        pieces = self.streamed_answer(engine, loaded, conversation, ids, max_new_tokens, response_id, start, now)

        def done() -> None:
            release()
            let_go()

        return _HeldStream(_events(chunks(pieces)), done, pieces)

    async def streamed_answer(
        self,
        engine: Engine,
        loaded: LoadedVersion,
        conversation: list[dict[str, str]],
        ids: list[int],
        max_new_tokens: int,
        response_id: str,
        start: float,
        now: datetime,
    ) -> AsyncIterator[str | Generation]:
        """The answer to one conversation piece by piece as the engine generates it, then the whole
        `Generation`, logged as a non-streamed answer is. If the stream is dropped (its client went away), the
        request is cancelled in the engine and its slot freed."""
        generation: Generation | None = None
        async with aclosing(engine.generate(ids, max_new_tokens)) as pieces:
            async for piece in pieces:
                if isinstance(piece, Generation):
                    generation = piece
                    break
                yield piece
        if generation is None:
            raise LLMOpsError("The engine's generation ended without an answer.")
        await self.record(response_id, conversation, generation.text, loaded, start, now)
        yield generation


async def _watch_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


async def _events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Chunks as Server-Sent Events, then `data: [DONE]`, as OpenAI streams them. A failure once the stream has
    begun (its 200 sent) ends it with an error event in OpenAI's error shape, which its clients raise."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except Exception as exc:
        log.exception("a streamed answer failed")
        yield f"data: {json.dumps(APIError.crashed(exc).body())}\n\n"
        return
    yield "data: [DONE]\n\n"


async def chat_completions(server: Server, request: Request, body: ChatRequest) -> dict[str, Any] | Response:
    start, now = time.perf_counter(), datetime.now(UTC)
    loaded = server.serving()
    conversation = [m.plain() for m in body.messages]
    check_turns(conversation, server.settings)
    check_prompt_chars(loaded, [conversation], server.settings)
    max_new_tokens = server.budget(body)
    response_id = TrafficLog.new_id("chatcmpl", now)
    head = {"id": response_id, "created": int(now.timestamp()), "model": loaded.name}
    if body.stream:

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        async def chunks(pieces: AsyncIterator[str | Generation]) -> AsyncIterator[dict[str, Any]]:
            yield chunk({"role": "assistant"})
            async for piece in pieces:
                yield chunk({"content": piece}) if isinstance(piece, str) else chunk({}, _finish_reason(piece))

        return await server.stream(loaded, conversation, max_new_tokens, chunks, response_id, start, now)
    [generation], usage = await server.answer(request, loaded, [conversation], max_new_tokens)
    await server.record(response_id, conversation, generation.text, loaded, start, now)
    message = {"role": "assistant", "content": generation.text}
    choice = {"index": 0, "message": message, "finish_reason": _finish_reason(generation)}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}


async def completions(server: Server, request: Request, body: CompletionRequest) -> dict[str, Any] | Response:
    """Each prompt is its own answer with its own id (`choices[i].id`: the response's id, then `-i` when there
    are several), so feedback names one answer."""
    start, now = time.perf_counter(), datetime.now(UTC)
    loaded = server.serving()
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt is an empty list; send a string or a list of strings.", param="prompt")
    if len(prompts) > server.settings.max_prompts:
        raise APIError(
            400,
            f"The request has {len(prompts)} prompts, over this server's limit of {server.settings.max_prompts} "
            "(serve.max_prompts). Split it into several requests.",
            param="prompt",
        )
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    check_prompt_chars(loaded, conversations, server.settings)
    max_new_tokens = server.budget(body)
    response_id = TrafficLog.new_id("cmpl", now)
    ids = [response_id] if len(prompts) == 1 else [TrafficLog.answer_id(response_id, i) for i in range(len(prompts))]
    head = {"id": response_id, "object": "text_completion", "created": int(now.timestamp()), "model": loaded.name}
    if body.stream:
        if len(prompts) != 1:
            raise APIError(
                400,
                f"stream: true answers one prompt, and this request has {len(prompts)}; stream with one prompt, "
                "or send stream: false to have them all answered at once.",
                param="prompt",
            )

        def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "id": response_id, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "choices": [choice]}

        async def chunks(pieces: AsyncIterator[str | Generation]) -> AsyncIterator[dict[str, Any]]:
            async for piece in pieces:
                yield chunk(piece) if isinstance(piece, str) else chunk("", _finish_reason(piece))

        return await server.stream(loaded, conversations[0], max_new_tokens, chunks, response_id, start, now)
    generations, usage = await server.answer(request, loaded, conversations, max_new_tokens)
    for answer_id, conversation, generation in zip(ids, conversations, generations, strict=True):
        await server.record(answer_id, conversation, generation.text, loaded, start, now)
    choices = [
        {"index": i, "id": ids[i], "text": g.text, "logprobs": None, "finish_reason": _finish_reason(g)}
        for i, g in enumerate(generations)
    ]
    return {**head, "choices": choices, "usage": usage}


async def feedback(server: Server, request: Request, body: Feedback) -> dict[str, Any]:
    """A rating (either key) or a correction (the reviewer key only) of one logged answer."""
    if server.traffic is None:
        raise APIError(409, "Traffic logging is off (serve.log_traffic: false): there is nothing to attach to.")
    role, by = server.keys.judge(request)
    if body.correction is not None:
        if role != "reviewer":
            raise server.keys.forbid_correction(request)
        if len(body.correction) > server.settings.max_correction_chars:
            raise APIError(
                400,
                f"The correction is {len(body.correction)} characters, over this server's limit of "
                f"{server.settings.max_correction_chars} (serve.max_correction_chars). Shorten it.",
                param="correction",
            )
    if body.rating is None and body.correction is None:
        raise APIError(400, "Send a `rating` (up or down), a `correction`, or both.", param="rating")
    server.feedback_rate.check(by or "no key")
    written = await run_in_threadpool(
        server.traffic.feedback, body.id, body.rating, body.correction, role=role, by=by, user=body.user
    )
    if not written:
        raise APIError(404, f"No logged answer has id {body.id!r} (unknown, or not sampled into the log).", param="id")
    return {"id": body.id, "object": "feedback", "recorded": True, "role": role}


def models(server: Server) -> dict[str, Any]:
    current = server.follower.current
    if current is None:
        return {"object": "list", "data": []}
    model = {"id": current.name, "object": "model", "created": int(current.loaded_at), "owned_by": "llmops"}
    return {"object": "list", "data": [model]}


# --- The HTTP API: the app -----------------------------------------------------------------------------------


def create_app(
    follower: ChampionFollower,
    settings: ServeParams,
    api_key: str | None,
    traffic: TrafficLog | None,
    reviewer_key: str | None = None,
) -> FastAPI:
    """The API. `follower` is started and stopped with the app; `traffic` None turns the log off.

    With a key set, the API's description (/docs, /redoc, /openapi.json) needs it too: it lists every endpoint
    and limit, which is for the clients that hold the key, not for whoever finds the port."""
    server = Server(follower, settings, Keys(api_key, reviewer_key), traffic)
    secrets = [k for k in (api_key, reviewer_key) if k]
    mask_server_logs(secrets)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        mask_server_logs(secrets)  # again: uvicorn configures its loggers as it starts
        server.loop = asyncio.get_running_loop()
        if follower.current is not None:
            server.engine(follower.current)  # ready before the first request
        follower.on_swap = server.retire_soon
        follower.start()
        yield
        follower.stop()
        follower.on_swap = None
        for loaded in [*server.retired, follower.current]:  # a stream still open gets 10 s, then is cut
            if loaded is not None:
                await server.close_engine(loaded, 10)

    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="llmops serve", lifespan=lifespan, **hidden)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    async def authorized(request: Request) -> None:  # async: runs on the event loop, never queued for a thread
        server.keys.require_serving(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return APIError(400, f"Invalid request: {problems}.").response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return APIError.crashed(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, "body" if exc.status_code == 413 else None).response()

    guarded = [Depends(authorized)]

    @app.post("/v1/chat/completions", dependencies=guarded, response_model=None)
    async def chat_route(request: Request, body: ChatRequest) -> dict[str, Any] | Response:
        return await chat_completions(server, request, body)

    @app.post("/v1/completions", dependencies=guarded, response_model=None)
    async def completions_route(request: Request, body: CompletionRequest) -> dict[str, Any] | Response:
        return await completions(server, request, body)

    @app.post("/v1/feedback")  # either key: `feedback` tells the roles apart
    async def feedback_route(request: Request, body: Feedback) -> dict[str, Any]:
        return await feedback(server, request, body)

    @app.get("/v1/models", dependencies=guarded)
    async def models_route() -> dict[str, Any]:
        return models(server)

    @app.get("/health", dependencies=guarded)
    async def health() -> JSONResponse:  # async, and cheap: answers while generation and log writes are busy
        state = follower.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    if api_key:
        _add_guarded_docs(app, guarded)
    return app


def _add_guarded_docs(app: FastAPI, guarded: list) -> None:
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=guarded, include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", dependencies=guarded, include_in_schema=False)
    async def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


def build(params: Params, api_key: str | None, reviewer_key: str | None = None) -> tuple[FastAPI, ChampionFollower]:
    """The app for `params`, with the current champion loaded (if there is one) before it takes requests.
    `reviewer_key` (env LLMOPS_REVIEWER_API_KEY for `llmops serve`) is the one key that may send corrections."""
    if reviewer_key is not None and reviewer_key == api_key:
        raise LLMOpsError(
            "LLMOPS_REVIEWER_API_KEY is the same as LLMOPS_SERVE_API_KEY: a reviewer key must differ from the "
            "serving key, or every client could write training data. Set a different reviewer key."
        )
    mask_server_logs([k for k in (api_key, reviewer_key) if k])  # before the first poll logs anything
    settings = params.serve
    follower = ChampionFollower(
        params.tracking, params.registry, params.work_dir / "serve" / "models", settings.poll_seconds
    )
    follower.check_once()
    if follower.current is None:
        log.warning(
            "no champion of %s to serve yet; requests get 503 until one is promoted (checked every %gs)",
            params.registry.model_name,
            settings.poll_seconds,
        )
    traffic = (
        TrafficLog(params.monitor.incoming / TRAFFIC_FOLDER, settings.sample_rate, settings.max_log_bytes)
        if settings.log_traffic
        else None
    )
    return create_app(follower, settings, api_key, traffic, reviewer_key), follower


def serve(params: Params, api_key: str | None, host: str | None = None, port: int | None = None) -> None:
    """Run the server until interrupted (`llmops serve`)."""
    import socket

    import uvicorn

    host, port = host or params.serve.host, port or params.serve.port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LLMOpsError(
                f"Cannot listen on {host}:{port} ({exc.strerror}). Stop what uses that port, or choose another "
                "with `llmops serve --port N` (or serve.port in params.yaml)."
            ) from None
    app, _ = build(params, api_key, os.environ.get("LLMOPS_REVIEWER_API_KEY") or None)
    uvicorn.run(app, host=host, port=port, log_level="info")
