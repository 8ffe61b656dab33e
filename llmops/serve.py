"""Serve the champion: an OpenAI-style HTTP API that follows the registry's `champion` alias.

- `ChampionFollower` polls the alias. When it moves (a promotion or a rollback), the new version is
  downloaded and loaded beside the one serving, checked to generate, and only then swapped in with one
  reference assignment. A request holds the version it started with until it answers, so nothing in flight
  fails; a version that fails to load is never swapped in, and the failure shows in `/health`.
- `create_app` is the FastAPI app: `/v1/chat/completions`, `/v1/completions` (whole, or streamed as
  Server-Sent Events while generating), `/v1/models`, `/health`, `/v1/feedback`, with bearer-token access
  and size limits.
- Each exchange is appended, redacted, to the traffic log under the monitor's incoming folder, and feedback
  beside it (`llmops.traffic`): the monitor and the next retrain read them back.
- `TextGenerator` is the MLflow model logged with each registered version: the same loading and generation
  code, shipped with the model (`code_paths`), so `mlflow models serve` needs no install of this project.

Only this module turns chat messages into model input (`_conversation_prompt`). The server reads the
registry; it never writes it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlflow.pyfunc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from llmops.chat import render_prompt
from llmops.data import Turn
from llmops.devices import resolve_placement
from llmops.errors import LLMOpsError
from llmops.modeling import Generation, generate, load_model, load_tokenizer
from llmops.traffic import TRAFFIC_FOLDER, TrafficLog

if TYPE_CHECKING:
    from llmops.config import Params, RegistryParams, ServeParams, TrackingParams

log = logging.getLogger(__name__)


# --- Model input and generation: shared by `llmops serve` and the registered MLflow model ---------------------


def _conversation_prompt(messages: Sequence[dict[str, str]]) -> list[Turn]:
    """Chat messages as the conversation turns training rendered (`llmops.chat`): the one place they meet."""
    return [Turn(m["role"], m["content"]) for m in messages]


def prompt_token_count(tokenizer, messages: Sequence[dict[str, str]]) -> int:
    """Tokens of the model input for `messages`, as generation will see them."""
    return len(render_prompt(tokenizer, _conversation_prompt(messages)))


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
    """The registered model: rows with a `prompt` string or chat `messages` in, greedy replies out.

    Params: `max_new_tokens` (default 64); `temperature` is accepted for API compatibility, and generation
    is greedy (the decoding the gate judged)."""

    def load_context(self, context) -> None:
        self.model, self.tokenizer = load_generator(context.artifacts["model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        rows = _input_rows(model_input)
        if not rows:  # MLflow drops input that matches no column of the signature, such as a list of strings
            raise LLMOpsError(
                'No rows to answer. Give rows of {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}]} '
                "(a list of them, or a DataFrame with those columns); a plain list of strings matches no column."
            )
        conversations = [_input_conversation(row) for row in rows]
        return [g.text for g in reply(self.model, self.tokenizer, conversations, max_new_tokens)]


def _input_rows(model_input: Any) -> list[Any]:
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame, as MLflow passes rows under a column schema
        return model_input.to_dict(orient="records")
    return list(model_input)


def _input_conversation(row: Any) -> list[dict[str, str]]:
    if isinstance(row, str):
        return [{"role": "user", "content": row}]
    messages = row.get("messages")
    if messages is not None and len(messages):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not isinstance(row.get("prompt"), str):
        raise LLMOpsError(f"A row needs a `prompt` string or chat `messages`; got {row!r}.")
    return [{"role": "user", "content": row["prompt"]}]


def model_signature():
    """Rows of `prompt` (a string) or `messages` (role/content objects); params max_new_tokens, temperature."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    return ModelSignature(
        inputs=Schema(
            [ColSpec("string", "prompt", required=False), ColSpec(Array(message), "messages", required=False)]
        ),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)]),
    )


# --- Following the champion ----------------------------------------------------------------------------------


@dataclass
class LoadedVersion:
    """One registered version in memory. `lock` serializes generation: tokenizers are not thread-safe."""

    model_name: str
    version: str
    model: Any
    tokenizer: Any
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)

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
            self.registry_error = f"{type(exc).__name__}: {exc}"
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
            self.failed[version] = {"error": f"{type(exc).__name__}: {exc}", "at": time.time()}
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


# --- The HTTP API --------------------------------------------------------------------------------------------


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    @classmethod
    def crashed(cls, exc: Exception) -> APIError:
        message = f"The server failed on this request ({type(exc).__name__}); its log has the details."
        return cls(500, message, "server_error")


class _ClientGone(Exception):
    """Raised into a streamed generation whose client went away: it ends there and lets the lock go."""


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
    id: str
    rating: Literal["up", "down"]
    correction: str | None = None


def create_app(
    follower: ChampionFollower, settings: ServeParams, api_key: str | None, traffic: TrafficLog | None
) -> FastAPI:
    """The API. `follower` is started and stopped with the app; `traffic` None turns the log off."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        follower.start()
        yield
        follower.stop()
        generation_thread.shutdown()

    app = FastAPI(title="llmops serve", lifespan=lifespan)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def authorized(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: the key cannot be guessed byte by byte
            raise APIError(401, "Missing or wrong API key: send `Authorization: Bearer <key>`.", "authentication_error")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return await api_error(request, APIError(400, f"Invalid request: {problems}."))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return await api_error(request, APIError.crashed(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(exc.status_code, str(exc.detail), "invalid_request_error"))

    def serving() -> LoadedVersion:
        current = follower.current  # held for the whole request: a switch meanwhile does not affect it
        if current is None:
            name = follower.registry.model_name
            raise APIError(503, f"No champion of {name} is loaded yet; see /health.", "unavailable")
        return current

    def budget(body: Sampling) -> int:
        """New tokens to generate for `body`; rejects what this server does not do."""
        if body.n != 1:
            raise APIError(400, f"n={body.n}: this server returns one choice per request; send n: 1.", param="n")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > settings.max_tokens:
            raise APIError(
                400,
                f"max_tokens {asked} is over this server's limit of {settings.max_tokens} (serve.max_tokens).",
                param="max_tokens",
            )
        return asked or settings.default_max_tokens

    # All generation runs on one thread: a new thread calling torch starts its own OpenMP pool, and idle
    # pools spinning on the same cores made requests several times slower than plain generate.
    generation_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    async def on_generation_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(generation_thread, fn, *args)

    def prompt_tokens(loaded: LoadedVersion, conversations: list[list[dict[str, str]]]) -> list[int]:
        """Prompt tokens of each conversation; one over serve.max_prompt_tokens is a 400."""
        with loaded.lock:
            counts = [prompt_token_count(loaded.tokenizer, c) for c in conversations]
        for count in counts:
            if count > settings.max_prompt_tokens:
                raise APIError(
                    400,
                    f"The prompt is {count} tokens, over this server's limit of {settings.max_prompt_tokens} "
                    "(serve.max_prompt_tokens). Shorten it.",
                    param="messages",
                )
        return counts

    def answer(loaded: LoadedVersion, conversations: list[list[dict[str, str]]], max_new_tokens: int):
        counts = prompt_tokens(loaded, conversations)
        with loaded.lock:
            generations = reply(loaded.model, loaded.tokenizer, conversations, max_new_tokens)
            completion = [len(loaded.tokenizer(g.text, add_special_tokens=False)["input_ids"]) for g in generations]
        usage = {"prompt_tokens": sum(counts), "completion_tokens": sum(completion)}
        return generations, {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

    def record(response_id: str, conversation, text: str, loaded: LoadedVersion, start: float, now: datetime) -> None:
        if traffic is not None:
            latency_ms = round((time.perf_counter() - start) * 1000, 2)
            traffic.append(
                response_id,
                conversation,
                text,
                model=loaded.name,
                version=loaded.version,
                latency_ms=latency_ms,
                timestamp=now.isoformat(timespec="milliseconds"),
            )

    async def streamed_answer(
        loaded: LoadedVersion,
        conversation: list[dict[str, str]],
        max_new_tokens: int,
        response_id: str,
        start: float,
        now: datetime,
    ) -> AsyncIterator[str | Generation]:
        """The answer to one conversation piece by piece as it is generated, then the whole `Generation`,
        logged as a non-streamed answer is. Generation runs on the generation thread under the version's lock;
        if the stream is dropped (its client went away), it ends at its next piece and lets the lock go."""
        loop, pieces, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def send(piece: str) -> None:
            if gone.is_set():
                raise _ClientGone
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        def run() -> Generation | None:
            try:
                with loaded.lock:
                    return reply(loaded.model, loaded.tokenizer, [conversation], max_new_tokens, on_text=send)[0]
            except _ClientGone:
                log.info("%s: the client went away mid-stream; its generation stopped there", response_id)
                return None
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)  # queued after every piece: their end

        job = loop.run_in_executor(generation_thread, run)
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            generation = await job
        finally:
            gone.set()
        record(response_id, conversation, generation.text, loaded, start, now)
        yield generation

    def event_stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        """Chunks as Server-Sent Events, then `data: [DONE]`, as OpenAI streams them. A failure once the stream
        has begun (its 200 sent) ends it with an error event in OpenAI's error shape, which its clients raise."""

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except Exception as exc:
                log.exception("a streamed answer failed")
                yield f"data: {json.dumps(APIError.crashed(exc).body())}\n\n"
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=None)
    async def chat_completions(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        start, now = time.perf_counter(), datetime.now(UTC)
        loaded = serving()
        conversation = [m.plain() for m in body.messages]
        max_new_tokens = budget(body)
        response_id = TrafficLog.new_id("chatcmpl", now)
        head = {"id": response_id, "created": int(now.timestamp()), "model": loaded.name}
        if body.stream:
            await on_generation_thread(prompt_tokens, loaded, [conversation])  # too long: a 400, before the stream

            def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                yield chunk({"role": "assistant"})
                async for piece in streamed_answer(loaded, conversation, max_new_tokens, response_id, start, now):
                    yield chunk({"content": piece}) if isinstance(piece, str) else chunk({}, _finish_reason(piece))

            return event_stream(chunks())
        [generation], usage = await on_generation_thread(answer, loaded, [conversation], max_new_tokens)
        record(response_id, conversation, generation.text, loaded, start, now)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text},
                    "finish_reason": _finish_reason(generation),
                }
            ],
            "usage": usage,
        }

    @app.post("/v1/completions", dependencies=[Depends(authorized)], response_model=None)
    async def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        start, now = time.perf_counter(), datetime.now(UTC)
        loaded = serving()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list; send a string or a list of strings.", param="prompt")
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        max_new_tokens = budget(body)
        response_id = TrafficLog.new_id("cmpl", now)
        head = {"id": response_id, "object": "text_completion", "created": int(now.timestamp()), "model": loaded.name}
        if body.stream:
            if len(prompts) != 1:
                raise APIError(
                    400,
                    f"stream: true answers one prompt, and this request has {len(prompts)}; stream with one prompt, "
                    "or send stream: false to have them all answered at once.",
                    param="prompt",
                )
            await on_generation_thread(prompt_tokens, loaded, conversations)  # too long: a 400, before the stream

            def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
                return {**head, "choices": [choice]}

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                async for piece in streamed_answer(loaded, conversations[0], max_new_tokens, response_id, start, now):
                    yield chunk(piece) if isinstance(piece, str) else chunk("", _finish_reason(piece))

            return event_stream(chunks())
        generations, usage = await on_generation_thread(answer, loaded, conversations, max_new_tokens)
        for conversation, generation in zip(conversations, generations, strict=True):
            record(response_id, conversation, generation.text, loaded, start, now)
        return {
            **head,
            "choices": [
                {"index": index, "text": g.text, "logprobs": None, "finish_reason": _finish_reason(g)}
                for index, g in enumerate(generations)
            ],
            "usage": usage,
        }

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models() -> dict[str, Any]:
        current = follower.current
        data = (
            []
            if current is None
            else [{"id": current.name, "object": "model", "created": int(current.loaded_at), "owned_by": "llmops"}]
        )
        return {"object": "list", "data": data}

    @app.post("/v1/feedback", dependencies=[Depends(authorized)])
    def feedback(body: Feedback) -> dict[str, Any]:
        if traffic is None:
            raise APIError(409, "Traffic logging is off (serve.log_traffic: false): there is nothing to attach to.")
        if not traffic.feedback(body.id, body.rating, body.correction):
            raise APIError(
                404, f"No logged response has id {body.id!r} (unknown, or not sampled into the log).", param="id"
            )
        return {"id": body.id, "object": "feedback", "recorded": True}

    @app.get("/health", dependencies=[Depends(authorized)])
    def health() -> JSONResponse:
        state = follower.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    return app


def build(params: Params, api_key: str | None) -> tuple[FastAPI, ChampionFollower]:
    """The app for `params`, with the current champion loaded (if there is one) before it takes requests."""
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
    return create_app(follower, settings, api_key, traffic), follower


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
    app, _ = build(params, api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
