"""`llmops serve`: a real uvicorn server over the real MLflow registry (SQLite in a temp folder) and the tiny
model, with versions registered by the project's own promote/rollback code."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient

from llmops import tracking
from llmops.config import load_params
from llmops.modeling import load_model, load_tokenizer
from llmops.serving.app import build
from llmops.serving.generation import reply
from llmops.serving.traffic_log import TrafficLog
from tests.conftest import PROJECT, register, write_params
from tests.llmops.test_engine import CONVERSATIONS

CHAT = {"messages": [{"role": "user", "content": "What color is the tiger?"}], "max_tokens": 4}
STORY = "Tell me a story about the sea and the sky."  # the tiny model answers it in many words, not one


def serve_params(tmp_path: Path, assets: Path, **serve):
    settings = {"poll_seconds": 0.3, **serve}
    return load_params(write_params(tmp_path, assets, **{f"serve__{k}": v for k, v in settings.items()}))


@contextmanager
def running(app):
    """The app on a real uvicorn server, on a free port of 127.0.0.1."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def generation_held(app):
    """Every generation slot of the champion's engine taken, as if `serve.max_batch` requests were generating:
    requests admitted meanwhile wait in the engine (its private semaphore, taken on the server's own loop)."""
    server = app.state.server
    engine = server.follower.current.engine

    async def take() -> None:
        for _ in range(engine.max_batch):
            await engine._slots.acquire()

    def give_back() -> None:
        for _ in range(engine.max_batch):
            engine._slots.release()

    asyncio.run_coroutine_threadsafe(take(), server.loop).result(timeout=30)
    try:
        yield engine
    finally:
        server.loop.call_soon_threadsafe(give_back)


def broken_copy(model_dir: Path, folder: Path) -> Path:
    """The model with its weights cut short: registers fine, cannot load."""
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


# Beyond one poll, the load and the longest request: the registry read and the new engine's start, stretched
# on a machine whose other test worker is training (a rollback followed in 3.33 s against a 3.08 s bound with
# 1 s). How fast a switch is on a quiet machine is the bench's serve_switch_latency row.
SWITCH_SLACK = 5.0


def test_requests_never_fail_through_promotion_rollback_and_a_broken_version(tmp_path, assets):
    params = serve_params(tmp_path, assets)
    assert register(params, assets / "model") == "1"
    app, follower = build(params, api_key=None)
    answers: list[tuple[float, int, str]] = []  # (time answered, status, model named in the answer)
    latencies: list[float] = []
    stop = threading.Event()

    def stream(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post("/v1/chat/completions", json=CHAT)
                    model = response.json().get("model", "") if response.status_code == 200 else response.text
                    answers.append((time.monotonic(), response.status_code, model))
                except httpx.HTTPError as exc:
                    answers.append((time.monotonic(), 0, repr(exc)))
                latencies.append(time.monotonic() - sent)

    def first_answer_from(model: str, since: float) -> float:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            hits = [t for t, status, m in list(answers) if m == model and t >= since]
            if hits:
                return hits[0] - since
            time.sleep(0.05)
        raise AssertionError(f"no answer from {model} within 60 s; /health: {follower.health()}")

    def switch_limit() -> float:
        """An answer arrives one request after the swap: the poll, the load and the longest request, and slack."""
        return params.serve.poll_seconds + follower.current.load_seconds + max(latencies) + SWITCH_SLACK

    def closed_once_free(version) -> None:
        """A replaced version's engine is closed (its requests done): nothing of it keeps running."""
        deadline = time.monotonic() + 60
        while version.engine is not None:
            assert time.monotonic() < deadline, f"the engine of {version.name} was never closed"
            time.sleep(0.05)
        assert version.retired and version.requests == 0

    with running(app) as url:
        # More clients than one: requests run batched in the engine while the versions swap under them
        clients = [threading.Thread(target=stream, args=(url,)) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            time.sleep(0.5)
            first = follower.current
            assert register(params, assets / "model") == "2"  # the alias moves at its very end
            promoted_at = time.monotonic()
            switch = first_answer_from("llmops-demo/2", promoted_at)
            assert switch <= switch_limit(), (switch, follower.health(), max(latencies))
            closed_once_free(first)

            second = follower.current
            tracking.rollback(params.tracking, params.registry, "test rollback")
            rolled_back_at = time.monotonic()  # as for the promotion: counted from the moment the alias moved
            switch_back = first_answer_from("llmops-demo/1", rolled_back_at)
            assert switch_back <= switch_limit(), (switch_back, follower.health(), max(latencies))
            closed_once_free(second)

            assert register(params, broken_copy(assets / "model", tmp_path / "broken")) == "3"
            deadline = time.monotonic() + 30
            while "3" not in follower.health()["failed_versions"]:
                assert time.monotonic() < deadline, follower.health()
                time.sleep(0.1)
            after_failure = time.monotonic()
            time.sleep(1.0)
            health = httpx.get(f"{url}/health").json()
        finally:
            stop.set()
            for client in clients:
                client.join()

    failures = [a for a in answers if a[1] != 200]
    assert not failures, failures[:5]
    assert len(answers) > 20
    assert {m for t, _, m in answers if t > after_failure} == {"llmops-demo/1"}  # the broken version never served
    assert health["version"] == "1" and health["status"] == "ok"
    assert "safetensor" in health["failed_versions"]["3"]["error"].lower()  # the load error, for the operator


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory, assets):
    """One registry with version 1 as champion, for the tests that only read it: its tracking params."""
    params = serve_params(tmp_path_factory.mktemp("serve-registry"), assets)
    register(params, assets / "model")
    return params.tracking


@pytest.fixture
def served(tmp_path, assets, shared_registry):
    """A TestClient on the app over the shared champion, with its own traffic folder; returns (client, params)."""

    with ExitStack() as started:  # each client runs the app's lifespan: its engine starts and is closed

        def make(api_key: str | None = None, reviewer_key: str | None = None, **serve):
            params = serve_params(tmp_path, assets, **serve).model_copy(update={"tracking": shared_registry})
            app, _ = build(params, api_key, reviewer_key)
            return started.enter_context(TestClient(app)), params

        yield make


def test_chat_and_completions_speak_openai_and_name_the_version(served):
    client, _ = served()
    chat = client.post("/v1/chat/completions", json=CHAT).json()
    assert chat["object"] == "chat.completion" and chat["model"] == "llmops-demo/1"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["finish_reason"] in ("stop", "length")
    assert chat["usage"]["completion_tokens"] <= 4 and chat["usage"]["prompt_tokens"] > 0
    completion = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3}).json()
    assert completion["model"] == "llmops-demo/1" and [c["index"] for c in completion["choices"]] == [0, 1]
    assert client.get("/v1/models").json()["data"][0]["id"] == "llmops-demo/1"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["version"] == "1"


def test_api_key_is_required_when_set(served):
    client, _ = served(api_key="s3cret")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
    wrong = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models").status_code == 401
    good = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"})
    assert good.status_code == 200
    assert client.post("/v1/chat/completions", json={**CHAT, "stream": True}).status_code == 401


def test_bad_requests_get_400_naming_the_problem(served):
    client, params = served(max_tokens=8, default_max_tokens=4, max_prompt_tokens=20)
    too_many = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 9})
    assert too_many.status_code == 400 and "serve.max_tokens" in too_many.json()["error"]["message"]
    long_prompt = {"messages": [{"role": "user", "content": "tiger " * 50}]}
    for stream in (False, True):  # a stream is refused before it starts, with the same JSON error
        too_long = client.post("/v1/chat/completions", json={**long_prompt, "stream": stream})
        assert too_long.status_code == 400 and "serve.max_prompt_tokens" in too_long.json()["error"]["message"]
    malformed = client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400 and "Invalid request" in malformed.json()["error"]["message"]
    for body in ({}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}, {**CHAT, "n": 2}):
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (body, response.text)
    assert client.post("/v1/completions", json={"prompt": 3}).status_code == 400


def traffic_rows(params, kind: str = "traffic") -> list[dict]:
    files = sorted((params.monitor.incoming / "traffic").glob(f"{kind}-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


SERVING, REVIEWER = {"Authorization": "Bearer s3rve"}, {"Authorization": "Bearer r3view"}


def test_traffic_is_logged_redacted_one_row_per_answer_and_takes_feedback(served):
    client, params = served(api_key="s3rve", reviewer_key="r3view")
    secret = {"messages": [{"role": "user", "content": "I am ann@example.com, card 4111 1111 1111 1111"}]}
    answer = client.post("/v1/chat/completions", json={**secret, "max_tokens": 3}, headers=SERVING).json()
    [row] = traffic_rows(params)
    assert row["id"] == answer["id"] and row["model"] == "llmops-demo/1" and row["version"] == "1"
    assert row["latency_ms"] > 0 and row["timestamp"]
    assert [m["role"] for m in row["messages"]] == ["user"]  # only what the client sent
    assert row["answer"] == answer["choices"][0]["message"]["content"]  # the only text the server wrote
    user = row["messages"][0]["content"]
    assert "ann@example.com" not in user and "[REDACTED:email]" in user and "[REDACTED:card]" in user

    correction = {"id": answer["id"], "rating": "down", "correction": "The tiger is orange.", "user": "end-user-7"}
    assert client.post("/v1/feedback", json=correction, headers=REVIEWER).status_code == 200
    assert client.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}, headers=SERVING).status_code == 200
    reviewed, rated = traffic_rows(params, "feedback")
    assert reviewed["id"] == answer["id"] and reviewed["correction"] == "The tiger is orange."
    assert (reviewed["role"], reviewed["user"], rated["role"], rated["correction"]) == (
        "reviewer",
        "end-user-7",
        "user",
        None,
    )
    # `by` tells the keys apart without holding either
    assert len({reviewed["by"], rated["by"]}) == 2 and all(len(r["by"]) == 12 for r in (reviewed, rated))
    assert "r3view" not in json.dumps(reviewed) and "s3rve" not in json.dumps(rated)
    unknown = {"id": "chatcmpl-20260101T00-x", "rating": "up"}
    assert client.post("/v1/feedback", json=unknown, headers=SERVING).status_code == 404
    assert client.post("/v1/feedback", json={"id": answer["id"], "rating": "meh"}, headers=SERVING).status_code == 400
    assert client.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}).status_code == 401  # no key


def test_corrections_need_the_reviewer_key(served):
    client, params = served(api_key="s3rve", reviewer_key="r3view")
    answer = client.post("/v1/chat/completions", json=CHAT, headers=SERVING).json()
    correction = {"id": answer["id"], "correction": "Orange, with black stripes."}
    no_key = client.post("/v1/feedback", json=correction)
    assert no_key.status_code == 401
    serving_key = client.post("/v1/feedback", json=correction, headers=SERVING)
    assert serving_key.status_code == 403 and "reviewer key" in serving_key.json()["error"]["message"]
    assert traffic_rows(params, "feedback") == []
    assert client.post("/v1/feedback", json=correction, headers=REVIEWER).status_code == 200

    open_server, _ = served()  # no reviewer key configured: corrections are refused, ratings still count
    answer = open_server.post("/v1/chat/completions", json=CHAT).json()
    refused = open_server.post("/v1/feedback", json={"id": answer["id"], "correction": "x"})
    assert refused.status_code == 403 and "LLMOPS_REVIEWER_API_KEY" in refused.json()["error"]["message"]
    assert open_server.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}).status_code == 200


def test_a_correction_of_a_multi_prompt_request_lands_on_one_prompt(served):
    client, params = served(reviewer_key="r3view")
    response = client.post("/v1/completions", json={"prompt": ["What is 2+2?", "Capital of France?"], "max_tokens": 3})
    choices = response.json()["choices"]
    ids = [c["id"] for c in choices]
    assert ids == [f"{response.json()['id']}-0", f"{response.json()['id']}-1"]
    rows = {r["id"]: r for r in traffic_rows(params)}
    assert set(rows) == set(ids)
    assert [rows[i]["messages"][0]["content"] for i in ids] == ["What is 2+2?", "Capital of France?"]
    assert [rows[i]["answer"] for i in ids] == [c["text"] for c in choices]
    assert client.post("/v1/feedback", json={"id": ids[1], "correction": "Paris"}, headers=REVIEWER).status_code == 200
    [judged] = traffic_rows(params, "feedback")
    assert judged["id"] == ids[1] and judged["correction"] == "Paris"


def stream_chunks(response) -> list[dict]:
    """The chunks of a streamed answer, checked to be Server-Sent Events `data:` lines that end with [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1]), events
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert len({c["id"] for c in chunks}) == 1 and {c["model"] for c in chunks} == {"llmops-demo/1"}
    assert [c["choices"][0]["finish_reason"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
    return chunks


def logged_answer(params, response_id: str) -> str:
    [row] = [r for r in traffic_rows(params) if r["id"] == response_id]
    assert row["model"] == "llmops-demo/1"
    return row["answer"]


def test_chat_streams_the_greedy_answer_as_it_is_generated_and_logs_it(served):
    client, params = served()
    request = {"messages": [{"role": "user", "content": STORY}], "max_tokens": 24}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]
    chunks = stream_chunks(client.post("/v1/chat/completions", json={**request, "stream": True}))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"} and deltas[-1] == {}
    pieces = [d["content"] for d in deltas[1:-1]]
    assert len(pieces) > 1 and "".join(pieces) == whole["message"]["content"], pieces  # sent piece by piece
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]

    assert logged_answer(params, chunks[0]["id"]) == whole["message"]["content"]
    assert client.post("/v1/feedback", json={"id": chunks[0]["id"], "rating": "up"}).status_code == 200


def test_completions_stream_one_prompt(served):
    client, params = served()
    request = {"prompt": STORY, "max_tokens": 24}
    whole = client.post("/v1/completions", json=request).json()["choices"][0]
    chunks = stream_chunks(client.post("/v1/completions", json={**request, "stream": True}))
    assert {c["object"] for c in chunks} == {"text_completion"}
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert len(pieces) > 2 and "".join(pieces) == whole["text"] and pieces[-1] == "", pieces
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert logged_answer(params, chunks[0]["id"]) == whole["text"]

    several = client.post("/v1/completions", json={"prompt": ["a", "b"], "stream": True})
    assert several.status_code == 400 and "stream with one prompt" in several.json()["error"]["message"]


def test_a_dropped_stream_frees_its_slot_for_the_next_request(tmp_path, assets, shared_registry):
    # One slot and no queue: the next request is answered only if the dropped stream gave its slot back
    params = serve_params(tmp_path, assets, max_batch=1, max_queue=0).model_copy(update={"tracking": shared_registry})
    app, follower = build(params, api_key=None)
    admission = app.state.server.admission
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        engine = follower.current.engine
        request = {
            "messages": [{"role": "user", "content": STORY}],
            "max_tokens": params.serve.max_tokens,
            "stream": True,
        }
        with client.stream("POST", "/v1/chat/completions", json=request) as response:
            first = json.loads(next(response.iter_lines()).removeprefix("data: "))
            assert first["choices"][0]["delta"] == {"role": "assistant"}
        # The client hung up mid-stream: its request ends in the engine (cancelled, or finished) and lets go
        deadline = time.monotonic() + 30
        while engine.running or engine.waiting or admission.in_flight:
            assert time.monotonic() < deadline, (engine.running, engine.waiting, admission.in_flight)
            time.sleep(0.05)
        answer = client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200 and answer.json()["model"] == "llmops-demo/1"


def test_concurrent_greedy_answers_equal_one_at_a_time_answers(tmp_path, assets, shared_registry):
    params = serve_params(tmp_path, assets, max_batch=4).model_copy(update={"tracking": shared_registry})
    app, _ = build(params, api_key=None)
    model, tokenizer = load_model(assets / "model"), load_tokenizer(assets / "model")
    one_at_a_time = [reply(model, tokenizer, [c], max_new_tokens=24)[0].text for c in CONVERSATIONS]
    prompts = [c[0]["content"] for c in CONVERSATIONS if len(c) == 1]
    plain = [reply(model, tokenizer, [[{"role": "user", "content": p}]], 24)[0].text for p in prompts]
    chats: dict[int, str] = {}
    start = threading.Barrier(len(CONVERSATIONS))

    def ask(url: str, index: int) -> None:
        start.wait()
        body = {"messages": CONVERSATIONS[index], "max_tokens": 24}
        chats[index] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()

    with running(app) as url:
        # More requests than slots, sent together: they share forward passes, some wait and join as others end
        askers = [threading.Thread(target=ask, args=(url, i)) for i in range(len(CONVERSATIONS))]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        # The prompts of one completion request go to the engine together
        several = httpx.post(f"{url}/v1/completions", json={"prompt": prompts, "max_tokens": 24}, timeout=120).json()
    assert [chats[i]["choices"][0]["message"]["content"] for i in range(len(CONVERSATIONS))] == one_at_a_time
    assert [c["text"] for c in several["choices"]] == plain
    assert any(a != one_at_a_time[0] for a in one_at_a_time)  # different prompts, different answers


def test_traffic_sampling_and_size_cap(served):
    client, params = served(sample_rate=0.0)
    answer = client.post("/v1/chat/completions", json=CHAT).json()
    assert traffic_rows(params) == []
    assert client.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}).status_code == 404


def test_traffic_stops_at_the_size_cap(served):
    client, params = served(max_log_bytes=1000)
    for _ in range(6):
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    files = list((params.monitor.incoming / "traffic").glob("traffic-*.jsonl"))
    assert 0 < len(traffic_rows(params)) < 6 and sum(f.stat().st_size for f in files) <= 1000


HIDE_PROJECT = """
import json, os, sys
# Forget every way this project is importable: its folders on sys.path and the editable install's finder.
sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "llmops"))]
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
try:
    import llmops
    sys.exit("llmops is still importable from " + llmops.__file__)
except ImportError:
    pass
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
import llmops
out = model.predict([{"prompt": "What color is the tiger?"}], params={"max_new_tokens": 3})
out += model.predict([{"messages": [{"role": "user", "content": "What color is the tiger?"}]}])
strings = model.predict(["What is the capital of France?", "What color is the tiger?"], params={"max_new_tokens": 3})
one = model.predict("What is the capital of France?", params={"max_new_tokens": 3})
# What `mlflow models serve` runs for each request: its own scoring app on the loaded model.
from fastapi.testclient import TestClient
from mlflow.pyfunc import scoring_server
served = TestClient(scoring_server.init(model))
def invoke(body):
    response = served.post("/invocations", json=body)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]
http = {
    "inputs": invoke({"inputs": ["What is the capital of France?"], "params": {"max_new_tokens": 3}}),
    "rows": invoke({"inputs": [{"prompt": "What is the capital of France?"},
                               {"messages": [{"role": "user", "content": "What color is the tiger?"}]}],
                    "params": {"max_new_tokens": 3}}),
    "records": invoke({"dataframe_records": [{"prompt": "What is the capital of France?"}],
                       "params": {"max_new_tokens": 3}}),
}
try:
    model.predict([{"question": "no prompt here"}])
    refused = None
except Exception as exc:
    refused = str(exc)
print(json.dumps({"llmops": llmops.__file__, "out": list(out), "strings": list(strings), "one": list(one),
                  "http": http, "refused": refused}))
"""


def test_registered_model_ships_its_code_and_pins_only_public_releases(tmp_path, assets):
    params = serve_params(tmp_path, assets)
    version = register(params, assets / "model")
    folder = Path(
        tracking.mlflow.artifacts.download_artifacts(
            f"models:/{params.registry.model_name}/{version}", dst_path=str(tmp_path / "dl")
        )
    )
    requirements = [line.strip() for line in (folder / "requirements.txt").read_text().splitlines() if line.strip()]
    names = {r.split("==")[0].lower() for r in requirements}
    assert not names & {"llmops", "tasks", "flows"}, requirements
    assert not [r for r in requirements if "+" in r], requirements
    assert {"torch", "transformers", "mlflow"} <= names
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert {p["name"] for p in json.loads(mlmodel["signature"]["params"])} == {"max_new_tokens", "temperature"}
    assert (folder / "code" / "llmops" / "packaging.py").exists()

    # Load it where the project is not importable: only the code shipped with the model can run it.
    run = subprocess.run(
        [sys.executable, "-c", HIDE_PROJECT, str(folder)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["llmops"].startswith(str(folder)) and len(result["out"]) == 2
    # A plain string and a list of strings are prompts, through predict and through the scoring server
    assert len(result["strings"]) == 2 and all(isinstance(t, str) for t in result["strings"])
    assert len(result["one"]) == 1 and result["one"] == result["http"]["inputs"] == result["http"]["records"]
    assert result["http"]["rows"] == result["strings"]  # the same two prompts, as rows
    assert "`prompt` string or chat `messages`" in result["refused"]  # an error that says what to send


IMPORTED = """
import json, sys
import {module}
print(json.dumps([name for name in {names!r} if name in sys.modules]))
"""


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        # The registry answers (the follower asks it for the champion) without the tracking module.
        ("llmops.registry", ("llmops.tracking", "llmops.packaging", "llmops.serving.follower", "mlflow")),
        # Packaging a version for MLflow needs neither the HTTP app nor tracking, which imports it to register.
        ("llmops.packaging", ("llmops.tracking", "llmops.serving.app", "llmops.serving.follower")),
        # The HTTP app needs neither the packaging nor tracking.
        ("llmops.serving.app", ("llmops.packaging", "llmops.tracking")),
        # The tasks that read the traffic log need no web framework and no model.
        ("llmops.serving.traffic_log", ("llmops.serving.app", "fastapi", "torch", "transformers", "mlflow")),
    ],
)
def test_serving_packaging_tracking_and_the_registry_import_in_one_direction(module, absent):
    """No import circle: tracking imports the packaging to register a version, and nothing it imports comes back."""
    code = IMPORTED.format(module=module, names=absent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stdout


def test_llmops_serve_answers_from_the_champion(tmp_path, assets):
    """What `make serve` runs: the console command, as its own process, on a free port."""
    params = serve_params(tmp_path, assets)
    register(params, assets / "model")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "llmops.cli", "--params", str(tmp_path / "params.yaml"), "serve"]
    env = {**os.environ, "LLMOPS_SERVE_API_KEY": "k3y", "PYTHONPATH": str(PROJECT)}
    log = tmp_path / "serve.log"
    with log.open("w") as output:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=output, stderr=output)
    headers = {"Authorization": "Bearer k3y"}
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "llmops serve did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT).status_code == 401
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == "llmops-demo/1"
        stream = {**CHAT, "stream": True}
        chunks = stream_chunks(httpx.post(f"{url}/v1/chat/completions", json=stream, headers=headers, timeout=60))
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert streamed == answer.json()["choices"][0]["message"]["content"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_llmops_serve_on_a_taken_port_exits_2_with_one_paragraph(params_file, capsys):
    from llmops.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--params", str(params_file), "serve", "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert f"Cannot listen on 127.0.0.1:{port}" in error and "--port" in error and "Traceback" not in error


# --- Bounded admission and nothing leaking ---------------------------------------------------------------------


def error_of(response) -> str:
    return response.json()["error"]["message"]


def test_each_request_limit_is_refused_naming_it(served):
    client, _ = served(max_prompts=2, max_turns=3, max_body_bytes=5000)
    too_many = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
    assert too_many.status_code == 400 and "serve.max_prompts" in error_of(too_many)
    assert client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).status_code == 200

    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 2
    long_chat = client.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 2})
    assert long_chat.status_code == 400 and "serve.max_turns" in error_of(long_chat)

    big = json.dumps({"messages": [{"role": "user", "content": "x" * 6000}]}).encode()
    declared = client.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and "serve.max_body_bytes" in error_of(declared)
    # Sent in chunks with no Content-Length: counted as it arrives
    chunked = client.post(
        "/v1/chat/completions", content=iter([big[:3000], big[3000:]]), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in chunked.request.headers and chunked.status_code == 413
    assert "serve.max_body_bytes" in error_of(chunked)

    # More characters than max_prompt_tokens of this tokenizer's longest tokens could hold: refused on the
    # character count alone, before any tokenizing or rendering
    roomy, params = served(max_prompt_tokens=20)
    loaded = roomy.app.state.server.follower.current
    over = "x" * (params.serve.max_prompt_tokens * loaded.max_token_chars + 1)
    cheap = roomy.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": over}]})
    assert cheap.status_code == 400 and "characters" in error_of(cheap) and "serve.max_prompt_tokens" in error_of(cheap)


def test_feedback_limits_correction_length_and_rate_per_key(served):
    client, params = served(reviewer_key="r3view", max_correction_chars=50, feedback_per_minute=3)
    answer = client.post("/v1/chat/completions", json=CHAT).json()
    long = client.post("/v1/feedback", json={"id": answer["id"], "correction": "x" * 51}, headers=REVIEWER)
    assert long.status_code == 400 and "serve.max_correction_chars" in error_of(long)
    for _ in range(3):
        assert client.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}).status_code == 200
    limited = client.post("/v1/feedback", json={"id": answer["id"], "rating": "up"})
    assert limited.status_code == 429 and "serve.feedback_per_minute" in error_of(limited)
    assert int(limited.headers["Retry-After"]) >= 1
    # Another key has its own allowance
    assert client.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}, headers=REVIEWER).status_code == 200
    assert len(traffic_rows(params, "feedback")) == 4


def test_a_megabyte_message_is_refused_while_health_answers(tmp_path, assets, shared_registry):
    params = serve_params(tmp_path, assets).model_copy(update={"tracking": shared_registry})
    app, _ = build(params, api_key=None, reviewer_key="r3view")
    huge = "a." * 500_000  # 1 MB: quadratic for the old e-mail pattern, which ran on the event loop
    refused: dict[str, int] = {}
    with running(app) as url:

        def send(path: str, body: dict, headers: dict) -> None:
            refused[path] = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120).status_code

        answer = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60).json()
        senders = [
            threading.Thread(
                target=send, args=("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}, {})
            ),
            threading.Thread(target=send, args=("/v1/feedback", {"id": answer["id"], "correction": huge}, REVIEWER)),
        ]
        for sender in senders:
            sender.start()
        health = httpx.get(f"{url}/health", timeout=120)
        for sender in senders:
            sender.join()
        # Under the body limit, over the correction limit: refused before any redaction
        just_under = {"id": answer["id"], "correction": "a." * 400_000}
        under = httpx.post(f"{url}/v1/feedback", json=just_under, headers=REVIEWER, timeout=120)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert refused == {"/v1/chat/completions": 413, "/v1/feedback": 413}
    assert under.status_code == 400 and "serve.max_correction_chars" in error_of(under)


def test_64_concurrent_clients_get_answers_or_bounded_503s(tmp_path, assets, shared_registry):
    params = serve_params(tmp_path, assets, max_batch=1, max_queue=1).model_copy(update={"tracking": shared_registry})
    app, follower = build(params, api_key=None)
    results: list[tuple[int, str | None]] = []
    start = threading.Barrier(64)

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            start.wait()
            response = http.post("/v1/chat/completions", json=CHAT)
            results.append((response.status_code, response.headers.get("retry-after")))

    with running(app) as url:
        with generation_held(app):  # generation waits: the first requests hold the places, the rest are refused
            clients = [threading.Thread(target=client, args=(url,)) for _ in range(64)]
            for thread in clients:
                thread.start()
            deadline = time.monotonic() + 120
            while len(results) < 64 - 2:  # serve.max_batch generating + serve.max_queue waiting; the rest: 503 now
                assert time.monotonic() < deadline, results
                time.sleep(0.05)
        for thread in clients:
            thread.join()
    statuses = [status for status, _ in results]
    assert len(results) == 64 and set(statuses) == {200, 503}, results
    assert statuses.count(200) == 2 and statuses.count(503) == 62
    assert all(retry is not None and int(retry) >= 1 for status, retry in results if status == 503)


def test_a_client_that_goes_stops_its_generation_and_frees_its_place(tmp_path, assets, shared_registry, caplog):
    params = serve_params(tmp_path, assets, max_batch=1, max_queue=0).model_copy(update={"tracking": shared_registry})
    app, follower = build(params, api_key=None)
    admission = app.state.server.admission
    caplog.set_level(logging.INFO, logger="llmops.serving.app")
    with running(app) as url:
        with generation_held(app) as engine:  # its generation cannot start: the request waits for a slot
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
                httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=httpx.Timeout(60, read=1.0))
            deadline = time.monotonic() + 30
            while admission.in_flight or engine.waiting:  # its place is given back while every slot is taken
                assert time.monotonic() < deadline, "the place of a client that left was never given back"
                time.sleep(0.05)
        answer = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)  # max_queue 0: needs that place
    assert answer.status_code == 200
    assert [row["id"] for row in traffic_rows(params)] == [answer.json()["id"]]  # the abandoned one never answered
    assert any("went away" in record.getMessage() for record in caplog.records)


def test_docs_need_the_key(served):
    client, _ = served(api_key="s3rve")
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=SERVING).status_code == 200, path
    assert "/v1/chat/completions" in client.get("/openapi.json", headers=SERVING).json()["paths"]
    open_client, _ = served()  # no key: the usual FastAPI docs
    assert open_client.get("/docs").status_code == 200


def test_health_and_the_log_never_show_a_credential(tmp_path, assets, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    params = serve_params(tmp_path, assets)
    unreachable = params.tracking.model_copy(update={"uri": "http://ops:hunter2pw@127.0.0.1:9"})
    params = params.model_copy(update={"tracking": unreachable})
    caplog.set_level(logging.INFO)
    app, follower = build(params, api_key="s3rve")
    health = TestClient(app).get("/health", headers=SERVING)
    assert health.status_code == 503 and "ops:***@127.0.0.1" in health.json()["registry_error"]
    assert "hunter2pw" not in health.text
    # Whatever the server logs is masked too: a URI with a password, a bearer token, the server's own key
    logging.getLogger("llmops.serving.app").warning(
        "retrying %s with %s (key %s)", "postgresql://u:pw9@db/x", "Bearer tok3n-abc", "s3rve"
    )
    lines = [record.getMessage() for record in caplog.records]
    assert any("cannot read the champion alias" in line for line in lines)
    assert any("postgresql://u:***@db/x" in line for line in lines)
    assert not [line for line in lines if any(s in line for s in ("hunter2pw", "pw9@", "tok3n-abc", "s3rve"))]


def test_feedback_finds_answers_in_memory_and_from_before_a_restart(served, tmp_path):
    client, params = served()
    answer = client.post("/v1/chat/completions", json=CHAT).json()
    restarted, _ = served()  # a new server over the same traffic folder: it holds no ids in memory
    assert answer["id"] not in restarted.app.state.server.traffic._logged
    assert restarted.post("/v1/feedback", json={"id": answer["id"], "rating": "up"}).status_code == 200

    log = TrafficLog(tmp_path / "bounded", sample_rate=1.0, max_bytes=100_000, index_size=2)
    ids = [TrafficLog.new_id("chatcmpl", datetime.now(UTC)) for _ in range(3)]
    for answer_id in ids:
        assert log.append(answer_id, [{"role": "user", "content": "q"}], "a")
    assert list(log._logged) == ids[1:]  # the memory is bounded: the oldest id is forgotten first
    assert log.feedback(ids[0], "up", None, role="user") and log.feedback(ids[2], "up", None, role="user")
    assert not log.feedback(TrafficLog.new_id("chatcmpl", datetime.now(UTC)), "up", None, role="user")
