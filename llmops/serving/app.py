"""The HTTP app of `llmops serve`: `/v1/chat/completions`, `/v1/completions` (whole, or streamed as Server-Sent
Events while generating), `/v1/models`, `/health`, `/v1/feedback`.

- The handlers are plain functions of a `Server` (what they share); `create_app` only wires them, and `build`
  makes the app for `params` with the champion loaded (`llmops.serving.follower`).
- Bearer-token access (a serving key; a distinct reviewer key for corrections) and bounded admission
  (`llmops.serving.admission`): body size, prompts, turns and prompt tokens are checked before any rendering,
  at most `serve.max_queue` requests wait for a slot (more get 503 with Retry-After), and a request whose
  client has gone stops generating and frees its slot. Requests and errors are in OpenAI's shapes
  (`llmops.serving.protocol`).
- Generation is batched: each loaded version has its `llmops.serving.engine.Engine`, made on the event loop
  that serves, where up to `serve.max_batch` requests share every forward pass. A request holds its version
  (and so its engine) until it answers; when the champion moves, new requests go to the new version's engine
  and the old one is closed once the requests holding it are done (`Server.retire`).
- Each answer is appended, redacted, to the traffic log under the monitor's incoming folder, and feedback
  beside it (`llmops.serving.traffic_log`), off the event loop: the monitor and the next retrain read them back.
- Nothing the server shows or logs carries a credential (`llmops.serving.masking`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llmops.errors import LLMOpsError
from llmops.modeling import Generation
from llmops.serving.admission import (
    Admission,
    BodyLimit,
    Keys,
    RateLimit,
    check_prompt_chars,
    check_prompt_tokens,
    check_turns,
)
from llmops.serving.engine import Engine
from llmops.serving.follower import ChampionFollower, LoadedVersion
from llmops.serving.masking import mask_server_logs
from llmops.serving.protocol import APIError, ChatRequest, CompletionRequest, Feedback, Sampling
from llmops.serving.traffic_log import TRAFFIC_FOLDER, TrafficLog

if TYPE_CHECKING:
    from llmops.config import Params, ServeParams

log = logging.getLogger(__name__)


class _ClientGone(Exception):
    """The client of a non-streamed request went away: its generation was cancelled and its slot freed."""


def _finish_reason(generation: Generation) -> str:
    return "stop" if generation.stopped_at_eos else "length"


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


# --- Handlers: plain functions of a `Server` -----------------------------------------------------------------


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


# --- The app: `create_app` wires the handlers; `build` and `serve` run it ------------------------------------


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
