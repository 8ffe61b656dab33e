"""Concurrent generation on the real SmolLM2-135M-Instruct: the batching engine (`llmops.serving.engine.Engine`)
with 8 clients against 1, the same through `llmops serve`'s HTTP app (uvicorn, JSON chat completions, the engine
behind them), and the one-at-a-time path the server used before the engine (`llmops.serving.generation.reply`
on one worker thread, as `llmops serve` ran it under the version's lock) with the same clients and prompts.

`python bench/serve.py` prints the figures; `bench/run.py --only engine` records them. Each client sends its
requests one after another (a closed loop), so 8 clients keep up to 8 requests in flight.

`gptq_speed_figures` puts a GPTQ deployable against the merged model it came from on the same engine
(`bench/run.py --only real_gptq`).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoConfig

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from llmops.chat import render_prompt  # noqa: E402
from llmops.data import Turn  # noqa: E402
from llmops.modeling import Generation, gptq_kernel, load_model, load_tokenizer  # noqa: E402
from llmops.serving.engine import Engine  # noqa: E402
from llmops.serving.generation import reply  # noqa: E402

REAL_MODEL = PROJECT / "models" / "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain why the sky is blue to a child.",
    "Name three animals that live in the forest.",
    "How do plants make their food?",
    "Give me a tip for learning to cook.",
    "What is a prime number? Answer in two sentences.",
    "Tell me a short story about a cat who learns to fly.",
]


def _tokens(tokenizer, generation: Generation) -> int:
    """Generated tokens, as the server's usage counts them (the stop token included when it stopped)."""
    return len(tokenizer(generation.text, add_special_tokens=False)["input_ids"]) + generation.stopped_at_eos


def _engine_run(model, tokenizer, clients: int, per_client: int, new_tokens: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, generated tokens) with `clients` closed-loop clients."""

    async def run():
        engine = Engine(model, tokenizer, max_batch=max(clients, 1), max_tokens=512)
        latencies: list[float] = []
        tokens = 0

        async def client(index: int) -> None:
            nonlocal tokens
            for k in range(per_client):
                question = QUESTIONS[(index + k * clients) % len(QUESTIONS)]
                start = time.perf_counter()
                async for item in engine.generate(render_prompt(tokenizer, [Turn("user", question)]), new_tokens):
                    if isinstance(item, Generation):
                        tokens += _tokens(tokenizer, item)
                latencies.append(time.perf_counter() - start)

        try:
            await client(0)  # warm-up: the first step builds the cache and the generation thread's pools
            latencies.clear()
            tokens = 0
            start = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(clients)))
            return time.perf_counter() - start, latencies, tokens
        finally:
            await engine.close()

    return asyncio.run(run())


def _http_run(model, tokenizer, clients: int, per_client: int, new_tokens: int) -> tuple[float, list[float], int]:
    """The same through the HTTP app (`llmops.serving.app.create_app`, serve.max_batch = `clients`) on a real uvicorn
    server in this process, each client on its own thread with its own connection."""
    import httpx
    import uvicorn

    from llmops.config import Params, ServeParams
    from llmops.serving.app import create_app
    from llmops.serving.follower import ChampionFollower, LoadedVersion

    params = Params()
    follower = ChampionFollower(params.tracking, params.registry, PROJECT / "work" / "bench-serve", 3600)
    follower.current = LoadedVersion("smollm2", "1", model, tokenizer, 0.0)  # no registry: never polled
    settings = ServeParams(max_batch=max(clients, 1), log_traffic=False, max_prompt_tokens=256, max_tokens=64)
    app = create_app(follower, settings, api_key=None, traffic=None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def client(index: int, barrier: threading.Barrier | None) -> None:
        nonlocal tokens
        with httpx.Client(base_url=url, timeout=300) as http:
            if barrier is not None:
                barrier.wait()
            for k in range(per_client):
                body = {
                    "messages": [{"role": "user", "content": QUESTIONS[(index + k * clients) % len(QUESTIONS)]}],
                    "max_tokens": new_tokens,
                }
                start = time.perf_counter()
                answer = http.post("/v1/chat/completions", json=body)
                answer.raise_for_status()
                seconds = time.perf_counter() - start
                choice = answer.json()["choices"][0]
                with lock:  # counted as _tokens counts: the stop token included when it stopped
                    tokens += answer.json()["usage"]["completion_tokens"] + (choice["finish_reason"] == "stop")
                    latencies.append(seconds)

    try:
        client(0, None)  # warm-up
        latencies.clear()
        tokens = 0
        barrier = threading.Barrier(clients)
        threads = [threading.Thread(target=client, args=(i, barrier)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start, latencies, tokens
    finally:
        server.should_exit = True
        thread.join()


def _reply_run(model, tokenizer, clients: int, per_client: int, new_tokens: int) -> tuple[float, list[float], int]:
    """The same with every request on one worker thread, one at a time: the server before the engine."""
    worker = ThreadPoolExecutor(max_workers=1)

    def ask(question: str) -> Generation:
        return reply(model, tokenizer, [[{"role": "user", "content": question}]], new_tokens)[0]

    async def run():
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        tokens = 0

        async def client(index: int) -> None:
            nonlocal tokens
            for k in range(per_client):
                start = time.perf_counter()
                generation = await loop.run_in_executor(worker, ask, QUESTIONS[(index + k * clients) % len(QUESTIONS)])
                tokens += _tokens(tokenizer, generation)
                latencies.append(time.perf_counter() - start)

        await client(0)  # warm-up
        latencies.clear()
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return time.perf_counter() - start, latencies, tokens

    try:
        return asyncio.run(run())
    finally:
        worker.shutdown()


def concurrency_figures(clients: int = 8, per_client: int = 3, new_tokens: int = 32) -> list[dict]:
    """Rows for bench/run.py: total tokens/s and median latency, `clients` against 1, engine and reply()."""
    model, tokenizer = load_model(REAL_MODEL), load_tokenizer(REAL_MODEL)
    runs = {}
    for name, fn in (("engine", _engine_run), ("http", _http_run), ("reply", _reply_run)):
        for n in (1, clients):
            wall, latencies, tokens = fn(model, tokenizer, n, per_client if n > 1 else max(per_client, 3), new_tokens)
            runs[name, n] = (tokens / wall, statistics.median(latencies) * 1000)
    what = (
        f"SmolLM2-135M-Instruct on the CPU, greedy, up to {new_tokens} new tokens, closed-loop clients "
        f"({per_client} request(s) each with {clients}, 3 with 1)"
    )
    rows = []
    labels = (
        ("engine", "llmops.serving.engine.Engine"),
        ("http", "llmops serve's HTTP app (chat completions through the engine)"),
        ("reply", "one at a time (reply() on one thread)"),
    )
    for name, label in labels:
        (one_rate, one_p50), (many_rate, many_p50) = runs[name, 1], runs[name, clients]
        rows += [
            {
                "name": f"{name}_{clients}_clients_tokens_per_second",
                "ours": many_rate,
                "baseline": one_rate,
                "unit": "tokens/s",
                "detail": f"{label}: total generated tokens/s with {clients} concurrent clients vs 1; {what}",
            },
            {
                "name": f"{name}_{clients}_clients_latency_p50",
                "ours": many_p50,
                "baseline": one_p50,
                "unit": "ms",
                "detail": f"{label}: median request latency with {clients} concurrent clients vs 1; {what}",
            },
        ]
    rows.append(
        {
            "name": f"http_vs_reply_{clients}_clients",
            "ours": runs["http", clients][0],
            "baseline": runs["reply", clients][0],
            "unit": "tokens/s",
            "detail": f"total tokens/s with {clients} concurrent clients, HTTP app vs one at a time; {what}",
        }
    )
    rows.append(
        {
            "name": f"engine_vs_reply_{clients}_clients",
            "ours": runs["engine", clients][0],
            "baseline": runs["reply", clients][0],
            "unit": "tokens/s",
            "detail": f"total tokens/s with {clients} concurrent clients, engine vs one at a time; {what}",
        }
    )
    return rows


def gptq_speed_figures(gptq: Path, merged: Path, what: str, clients: int = 8, new_tokens: int = 32) -> list[dict]:
    """The GPTQ deployable against the merged model it came from, on the engine as `llmops serve` runs them: one
    client (batch 1) and `clients` at once, the GPTQ model with the kernel this host measured fastest."""
    rates = {}
    for name, folder in (("gptq", gptq), ("merged", merged)):
        model, tokenizer = load_model(folder), load_tokenizer(folder)
        for n in (1, clients):
            wall, _, tokens = _engine_run(model, tokenizer, n, 1 if n > 1 else 3, new_tokens)
            rates[name, n] = tokens / wall
    kernel = gptq_kernel(gptq, AutoConfig.from_pretrained(gptq), torch.float32, "cpu")
    return [
        {
            "name": f"real_gptq_speed_{n}_clients",
            "ours": rates["gptq", n],
            "baseline": rates["merged", n],
            "unit": "tokens/s",
            "detail": f"{what}: GPTQ 4-bit ({kernel} kernel, measured fastest here) vs the merged fp32 model, "
            f"total tokens/s through llmops.serving.engine.Engine with {n} concurrent client(s), greedy, up to "
            f"{new_tokens} new tokens; {speed_verdict(rates['gptq', n] / rates['merged', n])}",
        }
        for n in (1, clients)
    ]


def speed_verdict(ratio: float) -> str:
    """Whether quantizing made the deployable faster on this device, in plain words."""
    if ratio >= 1.0:
        return "4-bit is the faster deployable on this CPU"
    return (
        "no 4-bit kernel beats the unquantized model on this CPU at this size: quantize.method: none deploys "
        "the faster (but larger) merged model"
    )


if __name__ == "__main__":
    for row in concurrency_figures():
        print(
            f"{row['name']:36} ours {row['ours']:10.4g}  baseline {row['baseline']:10.4g}  "
            f"ratio {row['ours'] / row['baseline']:.3f}"
        )
