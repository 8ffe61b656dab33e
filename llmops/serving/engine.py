"""The serving engine: concurrent generation requests share forward passes. It knows nothing of HTTP.

`Engine` wraps transformers' continuous batching (`model.init_continuous_batching()`, the engine behind
`transformers serve`): one background thread runs the model on a paged KV cache, and every step it decodes one
token for each running request and prefills requests that just arrived, so a request joins the batch at the
next step instead of waiting for the others to finish. It runs on the CPU in fp32 as on CUDA, and takes each
request's own stop ids and new-token budget. What is written here by hand, and why:

- **Slots.** At most `max_batch` requests run at once; the rest wait, FIFO, in `generate` (an asyncio
  semaphore), where `waiting` counts them: the HTTP layer bounds admission with it. transformers' own queue has
  no count an admission check can read, and its KV cache is sized here for `max_batch` requests of
  `max_tokens` tokens each, so a running request is never evicted (eviction re-prefills it from scratch).
- **Cancellation.** A consumer that stops iterating (breaks, or its task is cancelled: an HTTP client that
  left) cancels its request in the manager, which frees its cache blocks at the next step, and gives its slot
  to the next waiting request. transformers cancels the request but keeps its result handler; it is dropped here.
- **Text.** Pieces of text are decoded as `llmops.modeling.generate(on_text=...)` decodes them, and the final
  `Generation` by the same function, so a streamed answer joins to exactly the text a one-at-a-time `reply()`
  gives, and the answers are the same token for token (greedy, fp32 on the CPU; tested).
- **Exactness.** Prefix sharing (reusing cache blocks of a common prompt prefix) is off: a prefix computed in
  another batch can differ from a fresh prefill in the last bits, and greedy answers must equal one-at-a-time
  generation. A prompt is prefilled in one forward pass (`max_batch_tokens` covers `max_tokens`) for the same
  reason.
- **Closing.** `close()` stops new requests, lets those in flight finish (or cancels them after `timeout`), then
  stops the background thread: the old champion's engine drains while the new one takes new requests.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from transformers import ContinuousBatchingConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from llmops.errors import LLMOpsError
from llmops.modeling import Generation, stop_token_ids
from llmops.modeling import _answer as answer_of  # the one decoding of an answer: reply() uses it too

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

PAGE_SIZE = 64  # tokens per page of the paged KV cache: small pages waste little on short chats


class EngineClosed(LLMOpsError):
    """The engine was closed: it takes no new requests (the server has swapped to another version)."""


@dataclass
class _Request:
    """One request in flight: the outputs the background thread delivers for it, and the text sent so far."""

    id: str
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: str = ""
    done: bool = False


_CANCELLED = object()  # put in a request's queue by close(): its engine cancelled it


class Engine:
    """Batches concurrent greedy generations of one model.

    Args:
        model: a causal LM (any device and dtype continuous batching supports; fp32 on the CPU).
        tokenizer: its tokenizer, used here only to decode answers.
        max_batch: requests that run at once; more wait in `generate` (see `waiting`).
        max_tokens: the longest request, prompt and new tokens together; sizes the KV cache
            (`max_batch` * `max_tokens` tokens) and the prefill of one prompt.

    Use it from one asyncio event loop. One engine per model object: continuous batching switches the model's
    attention to its paged cache while the engine runs.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch: int = 8, max_tokens: int = 2048
    ):
        if max_batch < 1 or max_tokens < 2:
            raise ValueError(f"max_batch must be >= 1 and max_tokens >= 2; got {max_batch} and {max_tokens}.")
        self.tokenizer, self.max_batch, self.max_tokens = tokenizer, max_batch, max_tokens
        self.default_stop_ids = frozenset(stop_token_ids(tokenizer, model))
        # The model's own generation settings, greedy, as `model.generate(do_sample=False)` applies them in reply().
        generation_config = copy.deepcopy(model.generation_config)
        generation_config.do_sample = False
        generation_config.eos_token_id = sorted(self.default_stop_ids)
        pages = math.ceil(max_tokens / PAGE_SIZE)
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=max_batch * pages + 1,
            max_batch_tokens=pages * PAGE_SIZE,
            max_requests_per_batch=max_batch,
            max_blocks_per_request=0,  # the fast decode path needs flash attention's kv-cache kernel
            allow_block_sharing=False,
            drop_unsupported_processors=False,  # run every processor reply() runs, never silently drop one
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=config
        )
        self._manager.start()
        self._slots = asyncio.Semaphore(max_batch)
        self._ids = itertools.count()
        self._live: dict[str, _Request] = {}  # running in the manager
        self._waiting = 0
        self._closed = False
        self._cancelled = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot (all `max_batch` are taken)."""
        return self._waiting

    @property
    def running(self) -> int:
        """Requests generating now."""
        return len(self._live)

    @property
    def closed(self) -> bool:
        return self._closed

    async def generate(
        self, prompt_ids: list[int], max_new_tokens: int, stop_ids: Iterable[int] | None = None
    ) -> AsyncIterator[str | Generation]:
        """The greedy answer to `prompt_ids` (`llmops.chat.render_prompt`'s ids): pieces of its text as they are
        decoded, which join to exactly the answer's text, then the whole `Generation`.

        It waits for a slot first (counted in `waiting`). Stopping iteration (`break`, or cancelling the task
        that iterates) cancels the request and frees its slot; use `contextlib.aclosing` to make that happen
        at once rather than when the generator is collected.

        Args:
            prompt_ids: the prompt's token ids.
            max_new_tokens: the most tokens to generate.
            stop_ids: tokens that end the answer; by default those `reply()` stops at
                (`llmops.modeling.stop_token_ids`).

        Raises:
            EngineClosed: the engine was closed before the request started, or closed with a timeout that
                cancelled it.
            ValueError: an empty prompt, or a prompt and `max_new_tokens` over `max_tokens`.
            LLMOpsError: generation failed in the model (the manager's error is in the message).
        """
        if self._closed:
            raise EngineClosed("This engine is closed and takes no new requests; send the request to its successor.")
        if not prompt_ids or max_new_tokens < 1:
            raise ValueError(f"A request needs a prompt and max_new_tokens >= 1; got {len(prompt_ids)} prompt ids.")
        if len(prompt_ids) + max_new_tokens > self.max_tokens:
            raise ValueError(
                f"The prompt ({len(prompt_ids)} tokens) and max_new_tokens ({max_new_tokens}) are over this engine's "
                f"max_tokens of {self.max_tokens}: shorten the prompt or ask for fewer tokens."
            )
        stops = sorted(self.default_stop_ids if stop_ids is None else set(stop_ids))
        self._idle.clear()
        self._waiting += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._waiting -= 1
            self._settle()
            raise
        self._waiting -= 1
        request: _Request | None = None
        try:
            if self._cancelled:
                raise EngineClosed("This engine was closed before the request started; send it to its successor.")
            request = self._start(prompt_ids, max_new_tokens, stops)
            async for item in self._pieces(request, stops):
                yield item
        finally:
            if request is not None:
                self._finish(request)
            self._slots.release()
            self._settle()

    def _start(self, prompt_ids: list[int], max_new_tokens: int, stops: list[int]) -> _Request:
        request = _Request(f"engine-{next(self._ids)}")
        # The handler goes in before the request, so no output of it can reach the manager's shared queue.
        self._manager.register_result_handler(request.id, request.outputs.put_nowait)
        added = self._manager.add_request(
            list(prompt_ids), request_id=request.id, max_new_tokens=max_new_tokens, streaming=True, eos_token_id=stops
        )
        if added is None:
            self._forget(request.id)
            failure = self._manager.background_thread_status.fatal_error
            raise LLMOpsError(f"The generation loop has stopped and takes no requests ({failure or 'stopped'}).")
        self._live[request.id] = request
        return request

    async def _pieces(self, request: _Request, stops: list[int]) -> AsyncIterator[str | Generation]:
        while True:
            output = await request.outputs.get()
            while not request.outputs.empty() and output is not _CANCELLED and not output.is_finished():
                output = request.outputs.get_nowait()  # a slow consumer skips to the latest state
            if output is _CANCELLED:
                raise EngineClosed("The engine was closed and cancelled this request before it finished.")
            if output.error is not None:
                request.done = True
                raise LLMOpsError(f"Generation failed in the model: {output.error}")
            ids = output.generated_tokens
            if output.is_finished():
                request.done = True
                generation = answer_of(self.tokenizer, ids, stops)
                if piece := self._extend(request, generation.text):
                    yield piece
                yield generation
                return
            # The last token may still change the text (a character split over tokens): decode without it.
            if piece := self._extend(request, answer_of(self.tokenizer, ids[:-1], stops).text.rstrip("\ufffd")):
                yield piece

    @staticmethod
    def _extend(request: _Request, text: str) -> str:
        if len(text) > len(request.sent) and text.startswith(request.sent):
            piece, request.sent = text[len(request.sent) :], text
            return piece
        return ""

    def _finish(self, request: _Request) -> None:
        self._live.pop(request.id, None)
        if not request.done:  # its consumer left (or close() gave up on it): stop it and free its cache blocks
            request.done = True
            self._manager.cancel_request(request.id)
            self._forget(request.id)
            log.info("%s: cancelled before it finished; its slot is free", request.id)

    def _forget(self, request_id: str) -> None:
        self._manager.output_router.result_handlers.pop(request_id, None)

    def _settle(self) -> None:
        if not self._live and not self._waiting:
            self._idle.set()

    async def close(self, timeout: float | None = None) -> None:
        """Take no new requests, let those in flight and waiting finish, then stop the generation thread.

        Args:
            timeout: seconds to wait for them; after that, the rest are cancelled (their consumers get
                `EngineClosed`). None waits for all; 0 cancels at once.
        """
        self._closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            self._cancelled = True  # a request still waiting for a slot gets EngineClosed when it gets one
            log.warning("closing the engine: %d requests cancelled after %gs", len(self._live), timeout)
            for request in list(self._live.values()):
                self._finish(request)  # cancelled in the manager now, whether or not its consumer iterates again
                request.outputs.put_nowait(_CANCELLED)  # its consumer ends with EngineClosed at its next piece
        await asyncio.to_thread(self._manager.stop, block=True)
