"""The batching engine on the real tiny model (and the real SmolLM2 where it is built): concurrent greedy answers
equal one-at-a-time `reply()`, a consumer that leaves frees its slot, stop ids end an answer, close() drains."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from llmops.chat import render_prompt
from llmops.data import Turn
from llmops.modeling import Generation, load_model, load_tokenizer
from llmops.serving.engine import Engine, EngineClosed
from llmops.serving.generation import reply
from tests.test_real_model import REAL_MODEL

# Prompts of different lengths: one word to several turns, so the batch mixes prefills and decodes of
# different sizes and requests finish at different steps.
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a story about the sea and the sky."}],
    [{"role": "user", "content": "What color is the tiger?"}],
    [
        {"role": "user", "content": "Name three animals that live in the forest and say what each one eats."},
        {"role": "assistant", "content": "The fox eats mice, the deer eats grass and the bear eats berries."},
        {"role": "user", "content": "Which of them sleeps all winter, and why does it do that?"},
    ],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Count from one to twenty in words, please, one number after the other."}],
]


@pytest.fixture(scope="module")
def tiny(assets):
    folder = assets / "model"
    return load_model(folder), load_tokenizer(folder)


def prompt_ids(tokenizer, conversation: list[dict[str, str]]) -> list[int]:
    return render_prompt(tokenizer, [Turn(m["role"], m["content"]) for m in conversation])


async def collect(engine: Engine, ids: list[int], max_new_tokens: int, stop_ids=None) -> tuple[str, Generation]:
    """The streamed pieces joined, and the final Generation."""
    pieces: list[str] = []
    async with aclosing(engine.generate(ids, max_new_tokens, stop_ids)) as stream:
        async for item in stream:
            if isinstance(item, Generation):
                return "".join(pieces), item
            pieces.append(item)
    raise AssertionError("the stream ended without a Generation")


def answers_concurrently(model, tokenizer, conversations, max_new_tokens: int, max_batch: int):
    async def run():
        engine = Engine(model, tokenizer, max_batch=max_batch, max_tokens=512)
        try:
            ids = [prompt_ids(tokenizer, c) for c in conversations]
            return await asyncio.gather(*(collect(engine, i, max_new_tokens) for i in ids))
        finally:
            await engine.close()

    return asyncio.run(run())


def test_concurrent_greedy_answers_equal_one_at_a_time_replies(tiny):
    model, tokenizer = tiny
    # A cap under the longest free answer, so some answers end at EOS and others at the cap (whatever this
    # session's tiny model says: a fixed cap could see every answer end at EOS).
    free = [reply(model, tokenizer, [c], max_new_tokens=40)[0] for c in CONVERSATIONS]
    cap = max(2, max(len(tokenizer(g.text, add_special_tokens=False)["input_ids"]) for g in free) - 1)
    one_at_a_time = [reply(model, tokenizer, [c], max_new_tokens=cap)[0] for c in CONVERSATIONS]
    # More requests than slots: some wait and join the batch as others finish.
    batched = answers_concurrently(model, tokenizer, CONVERSATIONS, max_new_tokens=cap, max_batch=4)
    assert [g for _, g in batched] == one_at_a_time
    assert [streamed for streamed, _ in batched] == [g.text for g in one_at_a_time]  # the pieces join to the text
    assert any(g.stopped_at_eos for g in one_at_a_time) and not all(g.stopped_at_eos for g in one_at_a_time)


def test_a_consumer_that_leaves_frees_its_slot_and_its_request_stops(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, CONVERSATIONS[1])

    async def run():
        engine = Engine(model, tokenizer, max_batch=1, max_tokens=512)
        try:
            leaving = aclosing(engine.generate(ids, 400, stop_ids=set()))  # would run 400 steps: it never stops
            async with leaving as stream:
                first = await anext(stream)
                assert isinstance(first, str) and engine.running == 1
                second = asyncio.create_task(collect(engine, ids, 8))
                await asyncio.sleep(0.05)
                assert engine.waiting == 1 and not second.done()  # the one slot is taken
            # The consumer left: its slot goes to the waiting request, which runs to its end.
            _, generation = await asyncio.wait_for(second, 120)
            assert engine.running == engine.waiting == 0
            # ... and the left request was cancelled in the generation loop, not left running there.
            scheduler = engine._manager.batch_processor.scheduler
            assert not scheduler.active_requests and not scheduler.waiting_requests
            return generation
        finally:
            await engine.close()

    generation = asyncio.run(run())
    assert generation == reply(model, tokenizer, [CONVERSATIONS[1]], max_new_tokens=8)[0]


def test_stop_ids_end_the_answer(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, CONVERSATIONS[1])

    async def run():
        engine = Engine(model, tokenizer, max_batch=2, max_tokens=512)
        try:
            _, free = await collect(engine, ids, 30, stop_ids=set())
            # A token the free answer says after its start: stopping at it cuts the answer there.
            stop = tokenizer(free.text, add_special_tokens=False)["input_ids"][3]
            _, stopped = await collect(engine, ids, 30, stop_ids={stop})
            return free, stopped
        finally:
            await engine.close()

    free, stopped = asyncio.run(run())
    assert not free.stopped_at_eos and stopped.stopped_at_eos
    assert len(stopped.text) < len(free.text) and free.text.startswith(stopped.text)


def test_close_finishes_what_is_in_flight_and_refuses_new_requests(tiny):
    model, tokenizer = tiny
    ids = [prompt_ids(tokenizer, c) for c in CONVERSATIONS[:3]]

    async def run():
        engine = Engine(model, tokenizer, max_batch=2, max_tokens=512)
        in_flight = [asyncio.create_task(collect(engine, i, 20)) for i in ids]  # one of them waits for a slot
        await asyncio.sleep(0.05)
        await engine.close()
        with pytest.raises(EngineClosed):
            await collect(engine, ids[0], 4)
        return [task.result()[1] for task in in_flight]

    drained = asyncio.run(run())
    assert drained == [reply(model, tokenizer, [c], max_new_tokens=20)[0] for c in CONVERSATIONS[:3]]


def test_close_with_a_timeout_cancels_what_is_left(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, CONVERSATIONS[1])

    async def run():
        engine = Engine(model, tokenizer, max_batch=1, max_tokens=512)
        endless = asyncio.create_task(collect(engine, ids, 400, stop_ids=set()))
        while engine.running == 0:
            await asyncio.sleep(0.01)
        await engine.close(timeout=0)
        with pytest.raises(EngineClosed):
            await endless

    asyncio.run(run())


def test_a_request_over_max_tokens_is_refused_before_it_waits(tiny):
    model, tokenizer = tiny

    async def run():
        engine = Engine(model, tokenizer, max_batch=1, max_tokens=64)
        try:
            with pytest.raises(ValueError, match="max_tokens of 64"):
                await collect(engine, [1] * 60, 8)
        finally:
            await engine.close()

    asyncio.run(run())


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_MODEL / "config.json").exists(), reason="run `make real-model` (make test does)")
def test_real_model_batched_answers_equal_one_at_a_time_replies():
    model, tokenizer = load_model(REAL_MODEL), load_tokenizer(REAL_MODEL)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
        *CONVERSATIONS[3:5],
    ]
    one_at_a_time = [reply(model, tokenizer, [c], max_new_tokens=24)[0] for c in conversations]
    batched = answers_concurrently(model, tokenizer, conversations, max_new_tokens=24, max_batch=4)
    assert [g for _, g in batched] == one_at_a_time
    assert "Paris" in batched[0][1].text
