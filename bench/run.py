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
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmops.config import FinetuneParams, MergeParams, QuantizeParams, ValidateParams
from llmops.data import Example, read_examples, write_jsonl
from llmops.modeling import folder_size_bytes, generate, load_model, load_tokenizer, response_perplexity
from tasks.bootstrap import world
from tasks.finetune import finetune
from tasks.merge import merge_adapter
from tasks.quantize import quantize_model
from tasks.validate import validate_dataset

PROJECT = Path(__file__).resolve().parents[1]
WORK = PROJECT / "work" / "bench"
BASE = PROJECT / "models" / "tiny-llama"
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
    return validate_dataset(ValidateParams(max_prompt_tokens=4096), str(BASE), 512, train, eval_).require_valid()


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
            Example(
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
    adapter = finetune(FinetuneParams(), str(BASE), demo, WORK / "gptq-ft", WORK / "ckpt")
    merged = merge_adapter(MergeParams(), str(BASE), adapter, demo, WORK / "gptq-merged")
    quantized = quantize_model(QuantizeParams(), merged, demo, WORK / "gptq-quantized")
    examples = read_examples(demo.eval)
    prompts = [e.prompt for e in examples]
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
            f"greedy generation of {len(prompts)} eval prompts, batch 16, up to 24 new tokens",
        ),
    ]


def bench_params(folder: Path) -> Path:
    """The shipped params.yaml with its own work folder and MLflow store, so nothing is cached or shared."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["model"]["base"] = str(BASE)
    raw["data"] = {"train": str(PROJECT / "data/demo/train.jsonl"), "eval": str(PROJECT / "data/demo/eval.jsonl")}
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


def gpu_figures(demo) -> list[Figure]:
    """On a CUDA GPU: bf16 LoRA and bitsandbytes QLoRA on a ~300M-parameter model, with model FLOPs
    utilisation against this GPU's measured bf16 matrix-multiply rate."""
    model = medium_model(WORK / "model-300m", hidden=1024, layers=24)
    parameters = sum(t.numel() for t in load_model(model).parameters())
    size, repeats = 8192, 20
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def matmuls(count: int) -> None:
        for _ in range(count):
            a @ b
        torch.cuda.synchronize()

    matmuls(3)  # warm-up
    seconds, _ = timed(lambda: matmuls(repeats))
    peak = repeats * 2 * size**3 / seconds
    runs = {
        q: finetune(
            FinetuneParams(quantization=q, epochs=2, batch_size=32), str(model), demo, WORK / f"gpu-{q}", WORK / "ckpt"
        )
        for q in ("none", "nf4")
    }
    # Frozen base: forward 2N and input gradients 2N FLOPs per token; the adapter's own gradients are negligible.
    mfu = {q: 4 * parameters * run.tokens_per_second / peak for q, run in runs.items()}
    name = torch.cuda.get_device_name()
    return [
        Figure(
            "gpu_qlora_throughput",
            runs["nf4"].tokens_per_second,
            runs["none"].tokens_per_second,
            "tokens/s",
            f"{name}, {parameters / 1e6:.0f}M parameters, bf16; MFU LoRA {mfu['none']:.1%}, QLoRA {mfu['nf4']:.1%} "
            f"of the measured {peak / 1e12:.0f} TFLOP/s bf16 matmul rate",
        ),
        Figure(
            "gpu_qlora_memory",
            runs["nf4"].peak_memory_mb,
            runs["none"].peak_memory_mb,
            "MB",
            f"{name}: peak GPU memory allocated, QLoRA vs LoRA, {parameters / 1e6:.0f}M parameters",
        ),
    ]


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
    packages = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "deepspeed", "gptqmodel"))
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


# Each group measures a few figures; `--only` picks groups by name.
GROUPS = {
    "finetune": lambda demo: [finetune_throughput(demo)],
    "packing": lambda demo: [packing_throughput()],
    "qlora": lambda demo: qlora_memory(demo, medium_model(WORK / "model-57m", hidden=768, layers=8)),
    "gptq": gptq_figures,
    "flow": lambda demo: flow_figures(),
    "gpu": lambda demo: gpu_figures(demo) if torch.cuda.is_available() else [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    chosen = parser.parse_args().only.split(",")
    unknown = sorted(set(chosen) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    shutil.rmtree(WORK, ignore_errors=True)  # a cache left by the last bench would fake the first-run times
    WORK.mkdir(parents=True)
    demo = dataset(PROJECT / "data/demo/train.jsonl", PROJECT / "data/demo/eval.jsonl")
    figures = [figure for group in chosen for figure in GROUPS[group](demo)]
    write_report(figures)
    for figure in figures:
        print(f"{figure.name:24} ours {figure.ours:10.4g}  baseline {figure.baseline:10.4g}  ratio {figure.ratio:.3f}")


if __name__ == "__main__":
    main()
