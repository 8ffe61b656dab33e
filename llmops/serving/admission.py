"""What a request must pass before it generates; each refusal is an `APIError`.

- Access (`Keys`): a bearer token, the serving key; a distinct reviewer key for corrections.
- Size, before any rendering: the body (`BodyLimit`, counted as it arrives), the turns (`check_turns`), the
  prompt's characters (`check_prompt_chars`), then its tokens, rendered once (`check_prompt_tokens`).
- A place (`Admission`): at most `serve.max_queue` requests wait for a generation slot; more get 503 with
  Retry-After.
- The rate of feedback per key (`RateLimit`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fastapi import Request
from starlette.exceptions import HTTPException

from llmops.serving.generation import prompt_ids
from llmops.serving.protocol import APIError

if TYPE_CHECKING:
    from llmops.config import ServeParams
    from llmops.serving.follower import LoadedVersion


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
