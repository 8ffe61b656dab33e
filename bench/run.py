"""`make bench`: each figure is a ratio of two things measured side by side in this one run.

Writes `bench/results.json` (a list of {name, ours, baseline, ratio, unit, detail}) and `docs/BENCHMARKS.md`.
Benchmarks are not tests: nothing here asserts a speed. On a CUDA host the same measurements run on the GPU
with a larger model, plus model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from data import validate_rows  # bench/data.py, beside this script
from llmops.chat import render_prompt
from llmops.config import EvaluateParams, FinetuneParams, MergeParams, QuantizeParams, ValidateParams, load_params
from llmops.data import Conversation, DatasetRef, read_conversations, write_jsonl
from llmops.modeling import (
    folder_size_bytes,
    generate,
    gptq_kernel,
    load_model,
    load_tokenizer,
    response_perplexity,
    stop_token_ids,
)
from tasks.bootstrap import world
from tasks.evaluate import evaluate_models
from tasks.finetune import finetune
from tasks.merge import compare_logits, merge_adapter, prompt_logits
from tasks.quantize import quantize_model

PROJECT = Path(__file__).resolve().parents[1]
WORK = PROJECT / "work" / "bench"
BASE = PROJECT / "models" / "tiny-llama"
REAL_MODEL = PROJECT / "models" / "smollm2-135m-instruct"  # `make real-model`
# The demo splits as params.yaml names them (folders), whatever rows `llmops ingest` has added since.
DEMO = load_params(PROJECT / "params.yaml").data
REPEATS = 2  # each side of a timing comparison runs this often, alternating; the median is reported


@dataclass
class Figure:
    name: str
    ours: float
    baseline: float
    unit: str
    detail: str

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def dataset(train: Path, eval_: Path) -> object:
    from tasks.validate import validate_dataset  # Great Expectations: not needed by the gpu group

    # Cleaned splits are written (and used) whenever cleaning changed something, e.g. rows ingested since.
    params = ValidateParams(max_prompt_tokens=4096)
    return validate_dataset(params, str(BASE), 512, train, eval_, out=WORK / "cleaned").require_valid()


def finetune_throughput(demo) -> Figure:
    """The finetune stage (training subprocess, checkpoints, log streaming, adapter checks) against a plain
    transformers + peft script at the same config, both timed from start to adapter on disk."""
    params = FinetuneParams(epochs=6)
    config = {
        "r": params.lora.r,
        "alpha": params.lora.alpha,
        "target_modules": params.lora.target_modules,
        **params.model_dump(include={"learning_rate", "epochs", "batch_size", "max_seq_len", "warmup_ratio", "seed"}),
    }
    command = [sys.executable, str(PROJECT / "bench" / "plain_finetune.py"), str(BASE), str(demo.train)]
    ours, plain = [], []
    for attempt in range(REPEATS):
        folder = WORK / f"throughput-{attempt}"
        start = time.perf_counter()
        result = finetune(params, str(BASE), demo, folder / "ft", folder / "ckpt")
        ours.append(result.tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        run = subprocess.run(
            [*command, str(folder / "plain"), json.dumps(config)], check=True, capture_output=True, text=True
        )
        plain.append(json.loads(run.stdout.strip().splitlines()[-1])["tokens"] / (time.perf_counter() - start))
    return Figure(
        "finetune_throughput",
        statistics.median(ours),
        statistics.median(plain),
        "tokens/s",
        f"wall clock from start to adapter saved, {params.epochs:g} epochs of the demo data on the tiny model "
        f"({result.steps} steps); each side {REPEATS} runs, median; ours {_list(ours)}, plain {_list(plain)}",
    )


def variable_length_data(folder: Path, rows: int = 600) -> tuple[Path, Path]:
    """Questions about one to twelve entities at once: responses from 1 to about 150 tokens."""
    rng = random.Random(0)
    facts = world(0)
    entities = sorted(facts)
    examples = []
    for index in range(rows):
        chosen = rng.sample(entities, rng.randint(1, 12))
        examples.append(
            Conversation.from_pair(
                prompt=f"Request {index}: give the color of the " + ", the ".join(chosen) + ".",
                response=" ".join(f"the {e} is {facts[e]['color']}." for e in chosen),
            )
        )
    write_jsonl(folder / "train.jsonl", examples[40:])
    write_jsonl(folder / "eval.jsonl", examples[:40])
    return folder / "train.jsonl", folder / "eval.jsonl"


def packing_throughput() -> Figure:
    folder = WORK / "variable"
    folder.mkdir(parents=True, exist_ok=True)
    data = dataset(*variable_length_data(folder))
    runs = {}
    for packing in (False, True):
        params = FinetuneParams(epochs=2, max_seq_len=256, packing=packing)
        runs[packing] = finetune(params, str(BASE), data, folder / f"ft-{packing}", folder / "ckpt")
    return Figure(
        "packing_throughput",
        runs[True].tokens_per_second,
        runs[False].tokens_per_second,
        "tokens/s",
        f"training tokens/s on {data.train_rows} rows of 1 to 12 facts (variable length), max_seq_len 256: "
        f"packed into {runs[True].sequences} sequences vs {runs[False].sequences} padded rows",
    )


def medium_model(folder: Path, hidden: int, layers: int) -> Path:
    """A randomly initialised Llama with the tiny model's tokenizer, large enough that weights dominate."""
    if not (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(BASE)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3 // 64 * 64,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def qlora_memory(demo, model: Path) -> list[Figure]:
    """QLoRA vs LoRA: the training process's peak memory, and the base weights as loaded for training."""
    parameters = sum(t.numel() for t in load_model(model).parameters())
    runs, weights = {}, {}
    for quantization in ("none", "nf4"):
        params = FinetuneParams(quantization=quantization, epochs=0.1)
        runs[quantization] = finetune(params, str(model), demo, WORK / f"memory-{quantization}", WORK / "ckpt")
        weights[quantization] = load_model(model, quantization).get_memory_footprint() / 2**20
    where = f"QLoRA NF4 vs LoRA on a {parameters / 1e6:.0f}M-parameter Llama"
    return [
        Figure(
            "qlora_memory",
            runs["nf4"].peak_memory_mb,
            runs["none"].peak_memory_mb,
            "MB",
            f"peak memory while training ({runs['none'].steps} steps), model loaded; GPU: allocated, CPU: resident "
            f"set, which also keeps the heap that loading in 4-bit used and freed; {where}",
        ),
        Figure("qlora_weights_memory", weights["nf4"], weights["none"], "MB", f"base weights in memory; {where}"),
    ]


def gptq_figures(demo) -> list[Figure]:
    """GPTQ 4-bit vs the merged full-precision model it came from: quality, size, generation speed."""
    from serve import speed_verdict  # bench/serve.py

    adapter = finetune(FinetuneParams(), str(BASE), demo, WORK / "gptq-ft", WORK / "ckpt")
    merged = merge_adapter(MergeParams(), str(BASE), adapter, demo, WORK / "gptq-merged")
    quantized = quantize_model(QuantizeParams(), merged, demo, WORK / "gptq-quantized")
    examples = read_conversations(demo.eval)
    prompts = [e.prompt for e in examples]
    kernel = gptq_kernel(quantized.model_dir, AutoConfig.from_pretrained(quantized.model_dir), torch.float32, "cpu")
    speed, perplexity = {}, {}
    for name, folder in (("gptq", quantized.model_dir), ("merged", merged.model_dir)):
        model, tokenizer = load_model(folder), load_tokenizer(folder)
        seconds, generations = timed(lambda: generate(model, tokenizer, prompts, max_new_tokens=24))  # noqa: B023
        new_tokens = sum(len(tokenizer(g.text, add_special_tokens=False)["input_ids"]) + 1 for g in generations)
        speed[name] = new_tokens / seconds
        perplexity[name] = response_perplexity(model, tokenizer, examples, 512)
    bits = f"{QuantizeParams().bits}-bit, group size {QuantizeParams().group_size}"
    return [
        Figure("gptq_quality", perplexity["gptq"], perplexity["merged"], "perplexity", f"eval responses; {bits}"),
        Figure(
            "gptq_size",
            folder_size_bytes(quantized.model_dir) / 2**20,
            folder_size_bytes(merged.model_dir) / 2**20,
            "MiB",
            "model folder on disk; embeddings and the output layer stay in full precision",
        ),
        Figure(
            "gptq_generation_speed",
            speed["gptq"],
            speed["merged"],
            "tokens/s",
            f"greedy generation of {len(prompts)} eval prompts, batch 16, up to 24 new tokens, GPTQ with the {kernel} "
            f"kernel (measured fastest here); {speed_verdict(speed['gptq'] / speed['merged'])}",
        ),
    ]


def merge_memory(demo) -> list[Figure]:
    """Peak host memory of the merge stage (one copy of the model) over the base model's size on disk, on a
    ~200M-parameter Llama built from a config, measured in a process of its own."""
    model = medium_model(WORK / "model-200m", hidden=1024, layers=16)
    parameters = sum(t.numel() for t in load_model(model).parameters())
    adapter = finetune(FinetuneParams(epochs=0.05), str(model), demo, WORK / "merge-ft", WORK / "ckpt")
    (WORK / "merge-adapter.json").write_text(adapter.model_dump_json())
    (WORK / "merge-data.json").write_text(demo.model_dump_json())
    command = [sys.executable, str(PROJECT / "bench" / "merge_memory.py"), str(model)]
    command += [str(WORK / "merge-adapter.json"), str(WORK / "merge-data.json"), str(WORK / "merge-out")]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=PROJECT).stdout
    memory = json.loads(output.strip().splitlines()[-1])
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    return [
        Figure(
            "merge_memory",
            memory["peak_mb"] - memory["baseline_mb"],
            weights,
            "MiB",
            f"merge stage's peak resident memory above the process's after imports, over the base's weights on disk "
            f"(fp32); {parameters / 1e6:.0f}M-parameter Llama, all-linear rank-16 adapter, fidelity check included",
        )
    ]


def real_model_merge(folder: Path, rows: int = 32) -> tuple:
    """SmolLM2-135M-Instruct (real pretrained weights, `make real-model`): one epoch of LoRA with the shipped
    defaults on `rows` chat rows, then the merge stage. Returns the dataset, the adapter and the merge result."""
    write_jsonl(folder / "train.jsonl", read_conversations(DEMO.train)[:rows])
    write_jsonl(folder / "eval.jsonl", read_conversations(DEMO.eval)[:24])
    from tasks.validate import validate_dataset

    data = validate_dataset(
        ValidateParams(), str(REAL_MODEL), 1024, folder / "train.jsonl", folder / "eval.jsonl", out=folder / "cleaned"
    ).require_valid()
    adapter = finetune(FinetuneParams(epochs=1), str(REAL_MODEL), data, folder / "ft", WORK / "ckpt")
    merged = merge_adapter(MergeParams(), str(REAL_MODEL), adapter, data, folder / "merged")
    return data, adapter, merged


def real_merge_figures() -> list[Figure]:
    """The merge's fidelity on real weights, and what rounding the merged weights to bf16 would do."""
    data, adapter, merged = real_model_merge(WORK / "real")
    fidelity = merged.fidelity
    tokenizer = load_tokenizer(REAL_MODEL)
    prompts = [e.prompt for e in read_conversations(data.eval)[: MergeParams().check_prompts]]
    adapted = PeftModel.from_pretrained(load_model(REAL_MODEL), adapter.adapter_dir)
    reference = prompt_logits(adapted, tokenizer, prompts)
    del adapted
    rounded = load_model(merged.model_dir)
    for parameter in rounded.parameters():
        parameter.data = parameter.data.to(torch.bfloat16).float()
    bf16 = compare_logits(reference, prompt_logits(rounded, tokenizer, prompts))
    return [
        Figure(
            "real_merge_fidelity",
            fidelity.max_relative_error,
            MergeParams().max_relative_error,
            "relative logit error",
            f"SmolLM2-135M-Instruct after one epoch on 32 rows, fp32 merge vs adapter model over {fidelity.positions} "
            f"positions: greedy agreement {fidelity.token_agreement:.4f}, mean KL {fidelity.mean_kl:.2e}, max "
            f"|logit difference| {fidelity.max_logit_diff:.2e} (the old absolute check's figure); merged weights "
            f"rounded to bf16 instead: relative error {bf16.max_relative_error:.2e}, agreement "
            f"{bf16.token_agreement:.4f}, mean KL {bf16.mean_kl:.2e}, max |difference| {bf16.max_logit_diff:.2e}",
        )
    ]


def real_gptq_figures() -> list[Figure]:
    """GPTQ with the shipped defaults on real weights: perplexity of the quantized vs the merged model, calibrated
    on 128 training rows, and for a team's first small set, 20 conversations that train and calibrate (the
    merged model writes the rest of the calibration set); and the 128-row deployable's serving speed against
    the merged model's, at 1 and 8 concurrent clients."""
    from serve import gptq_speed_figures  # bench/serve.py

    folder, shipped = WORK / "real-gptq", QuantizeParams()
    data, _, merged = real_model_merge(folder)
    write_jsonl(folder / "calibration.jsonl", read_conversations(DEMO.train))
    large = quantize_model(
        shipped, merged, data.model_copy(update={"train": folder / "calibration.jsonl"}), folder / "gptq"
    )
    small_data, _, small_merged = real_model_merge(folder / "20-rows", rows=20)
    small = quantize_model(shipped, small_merged, small_data, folder / "20-rows" / "gptq")
    setting = f"GPTQ {shipped.bits}-bit (group size {shipped.group_size}, act-order {shipped.act_order})"
    speed = gptq_speed_figures(large.model_dir, merged.model_dir, "SmolLM2-135M-Instruct, merged after one epoch")
    return [Figure(**row) for row in speed] + [
        Figure(
            "real_gptq_quality",
            large.perplexity,
            large.merged_perplexity,
            "perplexity",
            f"SmolLM2-135M-Instruct merged model vs its {setting}, calibrated on {large.calibration_rows} training "
            "rows; eval responses; target ratio <= 1.10",
        ),
        Figure(
            "real_gptq_quality_20_rows",
            small.perplexity,
            small.merged_perplexity,
            "perplexity",
            f"SmolLM2-135M-Instruct trained on 20 conversations, merged, vs its {setting}, calibrated on "
            f"{small.calibration_rows} rows: the 20 and {small.generated_calibration_rows} answers the merged model "
            "wrote to their prompts; eval responses; target ratio <= 1.10",
        ),
    ]


def bench_params(folder: Path) -> Path:
    """The shipped params.yaml with its own work folder and MLflow store, so nothing is cached or shared."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["model"]["base"] = str(BASE)
    raw["data"] = {"train": str(DEMO.train), "eval": str(DEMO.eval)}
    raw["tracking"] = {
        "uri": f"sqlite:///{folder / 'mlflow.db'}",
        "artifact_location": str(folder / "mlartifacts"),
        "experiment": "bench",
    }
    raw["work_dir"] = str(folder / "work")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder / "params.yaml"


def flow_figures() -> list[Figure]:
    """The whole retrain flow (`llmops run`: Prefect, MLflow tracking, artifacts) vs its stage functions
    called in a plain script; then the same flow again, unchanged, where the cache skips the heavy stages."""
    flow_params, plain_params = bench_params(WORK / "flow"), bench_params(WORK / "plain")
    llmops = [str(Path(sys.executable).with_name("llmops")), "--params", str(flow_params), "run", "--json"]
    first, _ = timed(lambda: subprocess.run(llmops, check=True, capture_output=True))
    plain, _ = timed(
        lambda: subprocess.run(
            [sys.executable, str(PROJECT / "bench" / "plain_pipeline.py"), str(plain_params)],
            check=True,
            capture_output=True,
        )
    )
    second, _ = timed(lambda: subprocess.run(llmops, check=True, capture_output=True))
    return [
        Figure(
            "flow_overhead",
            first,
            plain,
            "s",
            "wall clock of a first `llmops run` (validate to promote) vs the same stage functions in a plain "
            "script, each in a fresh process on the demo",
        ),
        Figure(
            "cached_rerun",
            second,
            first,
            "s",
            "an unchanged `llmops run` again vs the first run: finetune, merge and quantize come from the cache, and "
            "the candidate, bit-identical to the champion, is neither evaluated nor registered",
        ),
    ]


def serve_figures(demo) -> list[Figure]:
    """`llmops serve` (HTTP, JSON, auth, limits, traffic log) against plain transformers generate on the same
    model (the real SmolLM2-135M-Instruct, as a team would serve) and prompts, one request at a time; then the
    latencies around a champion switch."""
    import threading

    import httpx
    import uvicorn

    from llmops import tracking
    from llmops.config import load_params
    from llmops.serving.app import build
    from tasks.gate import GateDecision
    from tasks.promote import Lineage, promote

    params = load_params(bench_params(WORK / "serve"))
    client = tracking.client_for(params.tracking)
    experiment = client.create_experiment("bench-serve", artifact_location=params.tracking.artifact_location)

    def register() -> None:
        run_id = client.create_run(experiment).info.run_id
        lineage = Lineage(
            dataset_hash="bench",
            git_commit="bench",
            params_hash="bench",
            prefect_flow_run_id="bench",
            mlflow_run_id=run_id,
            reason="bench",
        )
        promote(params.registry, params.tracking, GateDecision(passed=True, checks=[]), REAL_MODEL, lineage)

    register()
    prompts = [c.prompt for c in read_conversations(demo.eval)][:32]
    max_new_tokens = 24
    app, follower = build(params, api_key=None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    def ask(http: httpx.Client, prompt) -> tuple[float, int]:
        body = {"messages": [turn.as_message() for turn in prompt], "max_tokens": max_new_tokens}
        seconds, response = timed(lambda: http.post("/v1/chat/completions", json=body))
        response.raise_for_status()
        return seconds, response.json()["usage"]["completion_tokens"]

    model, tokenizer = load_model(REAL_MODEL), load_tokenizer(REAL_MODEL)
    stops = stop_token_ids(tokenizer, model)  # the server's: every id that ends an answer

    def plain(prompt) -> tuple[float, int]:
        def run() -> int:
            ids = {"input_ids": torch.tensor([render_prompt(tokenizer, prompt)])}
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops)
            new = out[0, ids["input_ids"].shape[1] :].tolist()
            return next((i for i, token in enumerate(new) if token in stops), len(new))

        return timed(run)

    # Plain generate also runs on one worker thread, as the server's generation does, so both sides see the
    # same torch threading.
    from concurrent.futures import ThreadPoolExecutor

    plain_thread = ThreadPoolExecutor(max_workers=1)
    served, baseline = [], []
    with httpx.Client(base_url=url, timeout=60) as http:
        ask(http, prompts[0])  # warm-up
        plain_thread.submit(plain, prompts[0]).result()
        for _ in range(REPEATS):  # alternate the two sides so load on the machine hits both alike
            served += [ask(http, p) for p in prompts]
            baseline += [plain_thread.submit(plain, p).result() for p in prompts]

        # A switch: requests keep flowing while version 2 is registered, loaded and swapped in.
        latencies: list[float] = []
        register()
        while follower.current.version != "2":
            latencies.append(ask(http, prompts[len(latencies) % len(prompts)])[0])
        latencies += [ask(http, p)[0] for p in prompts[:8]]
    server.should_exit = True
    thread.join()
    plain_thread.shutdown()

    def rate(pairs: list[tuple[float, int]]) -> float:
        return sum(t for _, t in pairs) / sum(s for s, _ in pairs)

    def percentile(pairs: list[tuple[float, int]], q: float) -> float:
        return statistics.quantiles([s * 1000 for s, _ in pairs], n=100)[int(q) - 1]

    steady = statistics.median(s for s, _ in served) * 1000
    what = (
        f"SmolLM2-135M-Instruct, {len(prompts)} eval prompts x {REPEATS}, one request at a time, greedy, up to "
        f"{max_new_tokens} new tokens"
    )
    return [
        Figure(
            "serve_tokens_per_second",
            rate(served),
            rate(baseline),
            "tokens/s",
            f"HTTP chat completions (uvicorn, same process as the client) vs plain model.generate; {what}",
        ),
        Figure("serve_latency_p50", percentile(served, 50), percentile(baseline, 50), "ms", f"median; {what}"),
        Figure("serve_latency_p95", percentile(served, 95), percentile(baseline, 95), "ms", f"95th percentile; {what}"),
        Figure(
            "serve_switch_latency",
            max(latencies) * 1000,
            steady,
            "ms",
            f"longest request latency while a new champion was loaded beside the old one and swapped in "
            f"({len(latencies)} requests, none failed; load {follower.current.load_seconds:.2f} s) vs the median",
        ),
    ]


def qwen2_model(folder: Path) -> Path:
    """A randomly initialised model shaped like Qwen2.5-0.5B (24 layers, 896 wide, grouped-query attention,
    151,936-row tied embedding: 494M parameters), saved in bf16 as such checkpoints are, with the tiny
    model's tokenizer (its ids are a subset of the embedding rows)."""
    if not (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(BASE)
        config = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
    return folder


def bf16_matmul_rate(size: int = 8192, repeats: int = 20) -> float:
    """This GPU's dense bf16 matrix-multiply rate in FLOP/s: the ceiling MFU is measured against."""
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def matmuls(count: int) -> None:
        for _ in range(count):
            a @ b
        torch.cuda.synchronize()

    matmuls(3)  # warm-up
    seconds, _ = timed(lambda: matmuls(repeats))
    return repeats * 2 * size**3 / seconds


def generation_speed(folder: Path, prompts: list[str], batch: int, new_tokens: int) -> float:
    """New tokens per second of greedy generation, `batch` prompts at a time, exactly `new_tokens` each
    (EOS is not allowed to end a row early, so both models generate the same number of tokens). One untimed
    pass over the same batches first: Triton tunes its GPTQ kernel for every new input shape."""
    model, tokenizer = load_model(folder, dtype=torch.bfloat16, device="cuda"), load_tokenizer(folder)
    tokenizer.padding_side = "left"

    def run(rows: list[str]) -> None:
        ids = tokenizer(rows, return_tensors="pt", padding=True).to("cuda")
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def run_all() -> None:
        for start in range(0, len(prompts), batch):
            run(prompts[start : start + batch])
        torch.cuda.synchronize()

    run_all()
    seconds, _ = timed(run_all)
    return len(prompts) * new_tokens / seconds


def gpu_figures() -> list[Figure]:
    """On a CUDA GPU, a Qwen2-shaped 0.5B model: bf16 LoRA and NF4 QLoRA throughput with model FLOPs
    utilisation against this GPU's measured bf16 matmul rate, their peak memory, the wall time of merge,
    GPTQ quantization and evaluation on the GPU, and GPTQ generation speed against the bf16 merged model."""
    setup = GpuSetup.make()
    figures, adapter = gpu_training_figures(setup)
    stages, merged, quantized = gpu_stage_figures(setup, adapter)
    return figures + gpu_memory_figures(setup) + stages + gpu_generation_figures(setup, merged, quantized)


@dataclass
class GpuSetup:
    """What every GPU figure shares: the 0.5B model, its variable-length data, the GPU's bf16 matmul rate."""

    model: Path
    data: object
    parameters: int
    peak_flops: float
    folder: Path = WORK / "gpu"

    @property
    def where(self) -> str:
        return f"{torch.cuda.get_device_name()}, Qwen2-shaped {self.parameters / 1e6:.0f}M parameters"

    @classmethod
    def make(cls) -> GpuSetup:
        peak = bf16_matmul_rate()
        model = qwen2_model(WORK / "qwen2-0.5b")
        parameters = sum(t.numel() for t in load_model(model, device="cuda").parameters())
        (WORK / "gpu").mkdir(parents=True, exist_ok=True)
        return cls(model, DatasetRef.unvalidated(*variable_length_data(WORK / "gpu")), parameters, peak)


def gpu_training_figures(setup: GpuSetup) -> tuple[list[Figure], object]:
    """bf16 LoRA and NF4 QLoRA throughput with MFU; returns the LoRA adapter for the pipeline figures."""
    model, data, folder, where, peak, parameters = (
        setup.model,
        setup.data,
        setup.folder,
        setup.where,
        setup.peak_flops,
        setup.parameters,
    )
    figures = []

    # Throughput: packed 1024-token sequences, 8 per step, no recomputation.
    speed = {}
    for quantization in ("none", "nf4"):
        params = FinetuneParams(
            quantization=quantization, epochs=4, batch_size=8, max_seq_len=1024, packing=True, learning_rate=1e-4
        )
        speed[quantization] = finetune(params, str(model), data, folder / f"speed-{quantization}", folder / "ckpt")
    # Frozen base: forward 2N and input gradients 2N FLOPs per token; the adapter's own gradients are negligible.
    mfu = {q: 4 * parameters * run.tokens_per_second / peak for q, run in speed.items()}
    figures += [
        Figure(
            "gpu_lora_mfu",
            mfu["none"],
            1.0,
            "fraction",
            f"{where}: bf16 LoRA (r 16, all projections), packing, 8 x 1024 tokens per step, "
            f"{speed['none'].tokens_per_second:.0f} tokens/s = {mfu['none']:.1%} of the measured "
            f"{peak / 1e12:.0f} TFLOP/s bf16 matmul rate (4N FLOPs per token, attention not counted)",
        ),
        Figure(
            "gpu_qlora_throughput",
            speed["nf4"].tokens_per_second,
            speed["none"].tokens_per_second,
            "tokens/s",
            f"{where}: NF4 QLoRA vs bf16 LoRA, same packed batches; MFU QLoRA {mfu['nf4']:.1%}, "
            f"peak memory {speed['nf4'].peak_memory_mb:.0f} vs {speed['none'].peak_memory_mb:.0f} MB",
        ),
    ]
    return figures, speed["none"]


def gpu_memory_figures(setup: GpuSetup) -> list[Figure]:
    """Peak GPU memory of QLoRA vs LoRA training."""
    model, data, folder, where = setup.model, setup.data, setup.folder, setup.where
    # Memory: the setting QLoRA exists for, one 512-token sequence per pass with recomputation, so the
    # weights rather than the activations dominate.
    memory = {}
    for quantization in ("none", "nf4"):
        params = FinetuneParams(
            quantization=quantization,
            epochs=0.05,
            batch_size=4,
            micro_batch_size=1,
            max_seq_len=512,
            packing=True,
            gradient_checkpointing=True,
            learning_rate=1e-4,
        )
        memory[quantization] = finetune(params, str(model), data, folder / f"mem-{quantization}", folder / "ckpt")
    return [
        Figure(
            "gpu_qlora_memory",
            memory["nf4"].peak_memory_mb,
            memory["none"].peak_memory_mb,
            "MB",
            f"{where}: peak torch.cuda.max_memory_allocated while training, NF4 QLoRA vs bf16 LoRA, micro-batch "
            "1 x 512 tokens, gradient checkpointing",
        )
    ]


def gpu_stage_figures(setup: GpuSetup, adapter) -> tuple[list[Figure], Path, Path]:
    """Merge, GPTQ and evaluation wall times on the GPU, from `adapter`; returns the merged and GPTQ folders."""
    model, data, folder, where = setup.model, setup.data, setup.folder, setup.where
    merge_s, merged = timed(
        lambda: merge_adapter(MergeParams(), str(model), adapter, data, folder / "merged", device="cuda")
    )
    quantize_params = QuantizeParams(calibration_samples=64)
    quantize_s, quantized = timed(lambda: quantize_model(quantize_params, merged, data, folder / "gptq", "cuda"))
    evaluate_params = EvaluateParams(max_samples=40, max_new_tokens=24)
    evaluate_s, _ = timed(
        lambda: evaluate_models(
            evaluate_params, quantized.model_dir, str(model), None, data, folder / "eval", device="cuda"
        )
    )
    figure = Figure(
        "gpu_stage_seconds",
        merge_s + quantize_s + evaluate_s,
        1.0,
        "s",
        f"{where}: wall time of merge {merge_s:.1f} s (float32, with the logit check), GPTQ quantize "
        f"{quantize_s:.1f} s (4-bit, {quantize_params.calibration_samples} calibration rows, reload and "
        f"perplexity included; ratio {quantized.perplexity_ratio:.3f}), evaluate {evaluate_s:.1f} s "
        f"(candidate and base, {evaluate_params.max_samples} rows, bf16)",
    )
    return [figure], merged.model_dir, quantized.model_dir


def gpu_generation_figures(setup: GpuSetup, merged: Path, quantized: Path, new_tokens: int = 32) -> list[Figure]:
    """GPTQ generation speed with its CUDA kernel against the bf16 merged model, at batch 1 and 16."""
    prompts = [e.prompt for e in read_conversations(setup.data.eval)[:16]]
    figures = []
    kernel = gptq_kernel(quantized, AutoConfig.from_pretrained(quantized), torch.bfloat16, "cuda")
    for batch in (1, 16):
        rows = prompts[:4] if batch == 1 else prompts
        gptq, bf16 = (generation_speed(f, rows, batch, new_tokens) for f in (quantized, merged))
        figures.append(
            Figure(
                f"gpu_gptq_generation_batch{batch}",
                gptq,
                bf16,
                "tokens/s",
                f"{setup.where}: greedy generation, batch {batch}, {new_tokens} new tokens per row, GPTQ 4-bit "
                f"({kernel} kernel, measured fastest here) vs the bf16 merged model; one untimed pass first",
            )
        )
    return figures


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def write_report(figures: list[Figure]) -> None:
    """Merge `figures` into `bench/results.json` (a row of the same name is replaced) and rewrite the docs
    page from all rows, so a run of some groups (`--only`) keeps the others' last measurements."""
    results_file = PROJECT / "bench" / "results.json"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    now = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    fresh = {f.name: {**asdict(f), "ratio": round(f.ratio, 4), "measured": now, "device": gpu} for f in figures}
    old = json.loads(results_file.read_text()) if results_file.exists() else []
    results = [fresh.pop(row["name"], row) for row in old] + list(fresh.values())
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    packages = ", ".join(
        f"{p} {_version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "gptqmodel")
    )
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/run.py`); the same figures are in `bench/results.json`. Each figure is a",
        "ratio of two measurements taken side by side in one run on one machine. `bench/run.py --only GROUP,...`",
        "re-measures some groups and keeps the other rows.",
        "",
        f"- Last run: {now} on {platform.machine()}, {torch.get_num_threads()} CPU threads, device: {gpu}",
        f"- Python {platform.python_version()}, {packages}",
        "",
        "| benchmark | ours | baseline | ratio | unit | device | measured | what was measured |",
        "|---|---:|---:|---:|---|---|---|---|",
        *(
            f"| {r['name']} | {r['ours']:.4g} | {r['baseline']:.4g} | {r['ratio']:.3f} | {r['unit']} | "
            f"{r.get('device', 'cpu')} | {r.get('measured', '')} | {r['detail']} |"
            for r in results
        ),
        "",
    ]
    (PROJECT / "docs").mkdir(exist_ok=True)
    (PROJECT / "docs" / "BENCHMARKS.md").write_text("\n".join(lines))


def redaction_figures(demo) -> list[Figure]:
    from redaction import redaction_figures  # bench/redaction.py (this script's folder is on sys.path)

    return [Figure(**figure) for figure in redaction_figures()]


def monitor_figures(demo) -> list[Figure]:
    from monitor import monitor_figures  # bench/monitor.py

    return [Figure(**figure) for figure in monitor_figures(BASE, WORK / "monitor")]


def engine_figures(demo) -> list[Figure]:
    from serve import concurrency_figures  # bench/serve.py

    return [Figure(**figure) for figure in concurrency_figures()]


def two_runs_figures(demo) -> list[Figure]:
    from host_slots import two_runs_figures  # bench/host_slots.py

    return [Figure(**figure) for figure in two_runs_figures(bench_params, WORK / "two_runs")]


# Each group measures a few figures; `--only` picks groups by name.
GROUPS = {
    "finetune": lambda demo: [finetune_throughput(demo)],
    "packing": lambda demo: [packing_throughput()],
    "qlora": lambda demo: qlora_memory(demo, medium_model(WORK / "model-57m", hidden=768, layers=8)),
    "gptq": gptq_figures,
    "merge": merge_memory,
    "real": lambda demo: real_merge_figures(),
    "real_gptq": lambda demo: real_gptq_figures(),  # two GPTQ runs of a 30-layer model: ~9 min on 2 idle cores
    "flow": lambda demo: flow_figures(),
    "gpu": lambda demo: gpu_figures() if torch.cuda.is_available() else [],
    "serve": serve_figures,
    "engine": engine_figures,  # 8 concurrent clients vs 1 on the batching engine and on one-at-a-time reply()
    "redaction": redaction_figures,
    "two_runs": two_runs_figures,
    "monitor": monitor_figures,  # drift check time at 10x the training set and the traffic log vs 1x
    "data": lambda demo: [Figure(**row) for row in validate_rows(WORK)],  # llmops validate at 10k and 100k rows
}
NO_DEMO = {"gpu", "redaction", "two_runs", "data", "monitor", "engine"}  # groups that make their own data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    chosen = parser.parse_args().only.split(",")
    unknown = sorted(set(chosen) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    shutil.rmtree(WORK, ignore_errors=True)  # a cache left by the last bench would fake the first-run times
    WORK.mkdir(parents=True)
    # Some groups make their own data: a GPU host needs neither the demo split nor its validation suite.
    needs_demo = not set(chosen) <= NO_DEMO
    demo = dataset(DEMO.train, DEMO.eval) if needs_demo else None
    figures = [figure for group in chosen for figure in GROUPS[group](demo)]
    write_report(figures)
    for figure in figures:
        print(f"{figure.name:24} ours {figure.ours:10.4g}  baseline {figure.baseline:10.4g}  ratio {figure.ratio:.3f}")


if __name__ == "__main__":
    main()
