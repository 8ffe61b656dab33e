"""The one config model: `params.yaml`, one section per stage, validated on load.

Overrides (`llmops run --set finetune.learning_rate=1e-4`, or the Prefect UI's `overrides` parameter) are
applied to the YAML before validation, so they obey exactly the same rules as the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmops.errors import LLMOpsError

DEFAULT_PARAMS = Path("params.yaml")
_SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Section):
    base: str = Field(
        "models/tiny-llama",
        description="Base causal LM: a local folder (relative to params.yaml) or a Hugging Face model id.",
    )
    revision: str | None = Field(
        None, description="Tag, branch or commit of a hub model id (recorded in lineage); unset: the default branch."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off: only transformers' own architectures."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where every stage runs the model: `auto` is a CUDA GPU when one is visible, else the CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights and activations type of every stage (merge stays float32): `auto` is bfloat16 on a GPU "
        "that supports it, float16 on an older GPU, float32 on the CPU.",
    )


class DataParams(Section):
    """The dataset: JSONL in one of five shapes per file (messages, ShareGPT conversations, prompt/response,
    prompt/completion, Alpaca instruction/input/output), read as conversations."""

    train: Path = Field(
        Path("data/demo/train"),
        description="Training split: a JSONL file, or a folder of them (its *.jsonl files, each in its own shape).",
    )
    eval: Path = Field(Path("data/demo/eval"), description="Held-out evaluation split: a JSONL file or a folder.")
    excess_length: Literal["drop", "truncate_prompt", "raise"] = Field(
        "drop",
        description="Conversations longer than finetune.max_seq_len: `drop` them (counted in the report), "
        "`truncate_prompt` (keep the whole last answer, drop the earliest turns, then cut the start of the last "
        "question), or `raise` (the split fails).",
    )
    chat_template: Path | None = Field(
        None,
        description="A Jinja chat template file that replaces the tokenizer's own. Unset: the tokenizer's "
        "template, or the project's plain one when it has none.",
    )


class BootstrapParams(Section):
    """The default tiny base model and demo dataset, built locally because no model hub is reachable."""

    seed: int = Field(0, description="Seed for the tokenizer corpus, model init, pre-training and data.")
    vocab_size: int = Field(512, ge=64, description="Tokenizer vocabulary size.")
    hidden_size: int = Field(128, ge=32, description="Model width; a multiple of 32 so GPTQ groups fit.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide hidden_size.")
    pretrain_steps: int = Field(600, ge=1, description="Steps of language-model pre-training on the corpus.")
    max_position_embeddings: int = Field(
        2048, ge=64, description="Longest sequence the model takes; rotary positions make room free."
    )
    eval_fraction: float = Field(0.15, gt=0, lt=1, description="Share of the demo rows held out for eval.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> BootstrapParams:
        if self.hidden_size % self.num_heads or self.hidden_size % 32:
            raise ValueError("hidden_size must be a multiple of 32 and of num_heads")
        return self


class ValidateParams(Section):
    """Data-quality thresholds of the Great Expectations suite (token counts use the base model's tokenizer)."""

    min_rows: int = Field(10, ge=1, description="Fewest rows a split may have.")
    max_line_bytes: int = Field(1_000_000, ge=100, description="Longer lines are rejected without being read.")
    min_response_chars: int = Field(
        2, ge=1, description="Conversations with a shorter (or empty) assistant turn are dropped, in characters."
    )
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest acceptable prompt, in tokens.")
    max_response_tokens: int = Field(2048, ge=1, description="Longest acceptable response, in tokens.")
    max_dropped_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="The split fails when cleaning drops a larger share of its rows (duplicates, copies of eval "
        "rows, short answers, excess length). A few percent is export noise; a tenth means something upstream "
        "is broken (a wrong field mapping, a doubled file, max_seq_len far too small).",
    )
    max_leakage_ratio: float = Field(
        0.0, ge=0, le=1, description="Share of training prompts that may also appear in the eval split."
    )
    pii: Literal["redact", "fail", "allow"] = Field(
        "redact",
        description="E-mail addresses, phone numbers and card numbers: `redact` replaces them with "
        "[REDACTED:<kind>] in the cleaned split (the model cannot memorise them, the row still trains), `fail` "
        "rejects the split, `allow` keeps them. Counted in the report either way.",
    )


class LoraParams(Section):
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Layers that get an adapter: `all-linear` (every linear or Conv1D layer except the output "
        "head, PEFT's meaning), or a list of layer names (`[q_proj, v_proj]`), each matching the end of a module "
        "name. A name matching no layer of the model is an error before training starts.",
    )

    @model_validator(mode="after")
    def _names_given(self) -> LoraParams:
        names = self.target_modules
        if isinstance(names, list) and (not names or not all(name.strip() for name in names)):
            raise ValueError("target_modules must be `all-linear` or a non-empty list of layer names")
        return self


class DistributedParams(Section):
    """Training across processes with DeepSpeed ZeRO: one rank per GPU (NCCL), or CPU ranks over gloo."""

    processes: int = Field(
        1, ge=1, description="Training processes per host, one per GPU. 1 trains in one process without DeepSpeed."
    )
    hostfile: Path | None = Field(
        None,
        description="DeepSpeed hostfile (`host slots=N` per line) to train on several hosts over passwordless ssh; "
        "`processes` ranks start on each host. Unset: this host only.",
    )
    zero_stage: Literal[2, 3] = Field(
        2, description="2 shards optimizer state and gradients; 3 also shards the weights (models too big for a GPU)."
    )
    offload_optimizer: bool = Field(False, description="Keep ZeRO optimizer state in CPU memory (GPU hosts).")
    offload_params: bool = Field(False, description="Keep ZeRO-3 weight shards in CPU memory (GPU hosts).")
    timeout_minutes: float = Field(
        30,
        gt=0,
        description="Every rank is stopped and the stage fails if training prints nothing for this long, or a rank "
        "waits this long for the others (a dead or hung peer).",
    )

    @property
    def uses_deepspeed(self) -> bool:
        """Training runs as DeepSpeed ranks: several processes, or several hosts."""
        return self.processes > 1 or self.hostfile is not None

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DistributedParams:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params shards weights to the CPU, which needs zero_stage: 3")
        return self


class FinetuneParams(Section):
    quantization: Literal["none", "nf4"] = Field(
        "none", description="`nf4` loads the base in 4-bit with bitsandbytes and trains QLoRA."
    )
    lora: LoraParams = LoraParams()
    learning_rate: float = Field(3e-3, gt=0, le=1, description="Peak learning rate (linear decay).")
    epochs: float = Field(12.0, gt=0, description="Passes over the training split.")
    batch_size: int = Field(
        16, ge=1, description="Sequences per optimizer step, over all ranks (with packing, packed sequences)."
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences per forward pass on each rank; gradients accumulate up to batch_size. "
        "Unset: batch_size / ranks.",
    )
    max_seq_len: int = Field(
        1024, ge=8, description="Tokens per conversation; longer ones are handled by data.excess_length."
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each max_seq_len sequence (attention and positions stay per "
        "example): less padding, faster on variable-length data, fewer optimizer steps per epoch.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory for about a third more compute."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Training precision; `auto` follows the device policy (model.device / model.dtype)."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    seed: int = Field(0, description="Seed for adapter init and data order.")
    checkpoint_steps: int = Field(
        50, ge=1, description="Save a resumable checkpoint every N steps; a crashed run resumes from the newest."
    )
    distributed: DistributedParams = DistributedParams()
    # How this host is shared, not what the stage computes: excluded from dumps, so changing it changes
    # neither the stage's cache key, its checkpoint folder nor the params hash in the lineage.
    host_slots: int | None = Field(
        None,
        ge=1,
        exclude=True,
        description="Trainings this host runs at once (each takes a slot; one more waits for a free one). "
        "Unset: one per GPU, or one on a host without a GPU. A CPU training gets its share of the cores.",
    )

    @model_validator(mode="after")
    def _fits_the_ranks(self) -> FinetuneParams:
        if self.quantization == "nf4" and self.distributed.zero_stage == 3 and self.distributed.uses_deepspeed:
            raise ValueError(
                "QLoRA (quantization: nf4) cannot run under ZeRO-3: ZeRO-3 shards the weights, and bitsandbytes "
                "4-bit weights cannot be sharded here. Use distributed.zero_stage: 2 (the 4-bit base is small "
                "enough to keep whole on every rank) or quantization: none"
            )
        processes = self.distributed.processes
        per_rank = self.micro_batch_size or self.batch_size // processes
        if per_rank < 1 or self.batch_size % (per_rank * processes):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size x processes "
                f"({per_rank} x {processes}), so every optimizer step sees the same number of sequences"
            )
        return self


class MergeParams(Section):
    """The merge's fidelity check: the merged model (as saved) against the adapter model, both run in fp32 on
    eval prompts. The bounds are relative to the logits' own magnitude, so they hold at any model size."""

    min_token_agreement: float = Field(
        0.99, ge=0, le=1, description="Share of positions where both models' greedy next token must agree."
    )
    max_relative_error: float = Field(
        1e-2, gt=0, description="Largest |logit difference| / std of the adapter model's logits, per position."
    )
    max_kl: float = Field(
        1e-4, gt=0, description="Largest mean KL divergence (nats) of the merged model's next-token distribution."
    )
    check_prompts: int = Field(8, ge=1, description="Eval prompts used for the fidelity check.")


class QuantizeParams(Section):
    method: Literal["gptq", "none"] = Field("gptq", description="`none` deploys the merged model as is.")
    bits: Literal[2, 3, 4, 8] = Field(4, description="GPTQ weight bits.")
    group_size: int = Field(32, description="GPTQ group size; -1 for one group per row.")
    calibration_samples: int = Field(
        128,
        ge=1,
        description="Rows (prompt + response, as training renders them) that calibrate GPTQ: training rows; when the "
        "training set has fewer, its prompts answered again by the merged model (sampled) make up the rest.",
    )
    act_order: bool = Field(
        True, description="Quantize columns in order of decreasing activation (GPTQ's desc_act): better quality."
    )

    @model_validator(mode="after")
    def _group_size_is_power_of_two(self) -> QuantizeParams:
        if self.group_size != -1 and (self.group_size < 8 or self.group_size & (self.group_size - 1)):
            raise ValueError("group_size must be -1 or a power of two >= 8")
        return self


class EvaluateParams(Section):
    max_new_tokens: int = Field(24, ge=1, description="Generation budget per eval prompt.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate on the first N eval rows (all if unset).")


Metric = Literal["perplexity", "rouge_l", "bleu", "exact_match", "eos_rate"]
LOWER_IS_BETTER = {"perplexity"}


class GateParams(Section):
    """The promotion rules: which metrics have floors, which must improve on the base model, which must not
    regress against the champion. Rates are fractions in [0, 1]. The defaults suit open-ended chat data
    (perplexity and ROUGE-L); exact match only means something where answers are short and fixed."""

    floors: dict[Metric, float] = Field(
        default_factory=dict,
        description="Absolute bounds the candidate must meet: a minimum for rates, a maximum for perplexity. "
        "Example: {rouge_l: 0.3, eos_rate: 0.9}.",
    )
    vs_base: list[Metric] = Field(
        default_factory=lambda: ["perplexity", "rouge_l"],
        description="Metrics on which the candidate must beat the base model. Where both score 0 on a rate there "
        "is nothing to compare, and the check passes, saying so.",
    )
    vs_champion: list[Metric] = Field(
        default_factory=lambda: ["perplexity", "rouge_l"],
        description="Metrics on which the candidate must not fall behind the champion beyond the margins below.",
    )
    max_regression: float = Field(
        0.02, ge=0, le=1, description="Drop of a rate vs champion tolerated regardless of noise."
    )
    noise_z: float = Field(
        2.0, ge=0, description="Also tolerate drops within this many standard errors of the difference."
    )
    max_perplexity_increase: float = Field(
        0.05, ge=0, description="Largest relative perplexity increase vs champion (0.05 = 5%)."
    )
    vs_champion_on_traffic: list[Metric] = Field(
        default_factory=lambda: ["perplexity", "rouge_l"],
        description="Metrics compared with the champion on the traffic eval split (judged traffic held out by "
        "loop.eval_share), with the margins above. A run that folded in new judged traffic (a drift retrain) must "
        "also answer that traffic better: beyond the margin on at least one of them. No champion or no traffic "
        "eval rows: not checked, and the report says so.",
    )
    max_quantization_ppl_ratio: float = Field(
        1.10, ge=1, description="Largest perplexity ratio of the quantized model to the merged one."
    )

    @model_validator(mode="after")
    def _rates_are_fractions(self) -> GateParams:
        for metric, bound in self.floors.items():
            if metric in LOWER_IS_BETTER and bound < 1:
                raise ValueError(f"floors.{metric} is a maximum perplexity and must be >= 1, got {bound}")
            if metric not in LOWER_IS_BETTER and not 0 <= bound <= 1:
                raise ValueError(f"floors.{metric} is a rate and must be between 0 and 1, got {bound}")
        return self


class RegistryParams(Section):
    model_name: str = Field(
        "llmops-demo", min_length=1, description="Registered model name (env LLMOPS_REGISTERED_MODEL wins)."
    )


class TrackingParams(Section):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (env LLMOPS_TRACKING_URI wins).")
    artifact_location: str = Field(
        "mlartifacts", description="Artifact root for new experiments (env LLMOPS_ARTIFACT_LOCATION wins)."
    )
    experiment: str = Field("retrain", min_length=1, description="MLflow experiment name.")


class MonitorParams(Section):
    """Drift between an incoming batch and the data the champion was trained on; any check over its
    threshold counts as drift."""

    incoming: Path = Field(Path("data/incoming"), description="Folder (or file) of incoming JSONL rows to check.")
    min_rows: int = Field(20, ge=2, description="Fewer incoming rows than this are too few to judge; no verdict.")
    length_p_value: float = Field(
        0.01, gt=0, lt=1, description="Drift if the two-sample KS test on token lengths has p below this."
    )
    max_token_divergence: float = Field(
        0.2, gt=0, le=1, description="Drift if the Jensen-Shannon divergence (base 2) of token frequencies is above."
    )
    max_unseen_token_rate: float = Field(
        0.05, ge=0, le=1, description="Drift if more than this share of incoming tokens never occur in the reference."
    )
    max_perplexity_ratio: float = Field(
        1.5, gt=1, description="Drift if the champion's perplexity on incoming / on reference responses is above."
    )
    window_hours: float = Field(
        24.0,
        gt=0,
        description="Served traffic older than this is out of the check: only the hourly files and rows of the last "
        "window are read, so a check's cost does not grow with the log. Raise it where a day holds fewer than "
        "min_rows requests.",
    )
    reference_rows: int = Field(
        2000,
        ge=2,
        description="A fixed-size, seeded sample of the champion's training rows is the reference, so a check's cost "
        "does not grow with the training set.",
    )


class LoopParams(Section):
    """What served traffic may teach the model (`llmops.serving.traffic_log.judged_traffic`, folded in by
    `tasks/ingest.py`).

    Only text the server generated or a reviewer wrote ever becomes a training target; what the client sent is
    context, never a target."""

    user_ratings_train: bool = Field(
        False,
        description="An end user's \"up\" rating makes the server's answer a training target. Off by default: "
        "anyone holding the serving key can rate, so user ratings are recorded (with who gave them) but only a "
        "reviewer's judgment trains until a team trusts its users' ratings.",
    )
    user_corrections_train: bool = Field(
        False,
        description="A correction without the reviewer role (legacy feedback rows written before roles existed) "
        "becomes a training target. Off by default: corrections are arbitrary text.",
    )
    max_traffic_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Largest share of the training set that folded-in traffic may make up (1 = no cap). The "
        "newest judged exchanges beyond it wait for the next retrain. 0.2 keeps the curated data the majority, so "
        "a burst of judged traffic cannot swamp what the model learnt, while drifted traffic still moves it.",
    )
    eval_share: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Share of the judged exchanges held out as the traffic eval split (`traffic-eval.jsonl` beside "
        "the training split, versioned with it), chosen by a hash of the prompt: the same question always lands on "
        "the same side, and a held-out exchange never trains. Its references are reviewers' corrections only (a liked "
        "answer there is set aside: the server's own words would flatter the version that wrote them). The gate "
        "compares candidate and champion on it (gate.vs_champion_on_traffic). 0 holds nothing out.",
    )


class DeployParams(Section):
    """The Prefect deployments and the drift automation (`make platform`, `llmops deploy`)."""

    work_pool: str = Field("llmops", min_length=1, description="Process work pool the worker polls.")
    retrain_cron: str | None = Field("0 3 * * 1", description="Scheduled retraining (cron); null for none.")
    monitor_cron: str | None = Field("0 * * * *", description="Drift check of the incoming folder (cron).")
    timezone: str = Field("UTC", description="Time zone of both cron schedules.")
    drift_cooldown_minutes: float = Field(
        30, gt=0, description="At most one drift-triggered retrain in this window, however many drift events."
    )
    heartbeat_seconds: int = Field(
        60, ge=30, description="How often a flow run on a worker tells the Prefect server it is alive (>= 30)."
    )
    crashed_after_seconds: float = Field(
        300,
        gt=0,
        description="A flow run silent this long (its host died) is marked Crashed, which frees its slots; "
        "`prefect flow-run retry` then resumes it on any worker from its checkpoint.",
    )

    @model_validator(mode="after")
    def _silence_outlasts_a_heartbeat(self) -> DeployParams:
        if self.crashed_after_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"crashed_after_seconds ({self.crashed_after_seconds:g}) must be longer than heartbeat_seconds "
                f"({self.heartbeat_seconds}), or every healthy run would be marked Crashed between two heartbeats"
            )
        return self

    @model_validator(mode="after")
    def _schedules_parse(self) -> DeployParams:
        from datetime import datetime
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from cronsim import CronSim, CronSimError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.timezone!r} (use an IANA name such as Europe/Paris)") from None
        for name in ("retrain_cron", "monitor_cron"):
            expression = getattr(self, name)
            try:
                expression is None or CronSim(expression, datetime.now())
            except CronSimError as exc:
                raise ValueError(f"{name} {expression!r} is not a cron expression: {exc}") from None
        return self


class ServeParams(Section):
    """`llmops serve`: the champion over an OpenAI-style HTTP API, its traffic logged as data."""

    host: str = Field("127.0.0.1", min_length=1, description="Address to bind; 0.0.0.0 exposes the server.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    poll_seconds: float = Field(
        10.0, gt=0, description="How often the server asks the registry where `champion` points."
    )
    log_traffic: bool = Field(
        True, description="Append each request and its answer (redacted) to an hourly file under monitor.incoming."
    )
    sample_rate: float = Field(1.0, ge=0, le=1, description="Share of requests written to the traffic log.")
    max_log_bytes: int = Field(
        100_000_000, ge=1000, description="Largest size of an hourly traffic file; later rows of that hour are dropped."
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="Longest prompt a request may send, in tokens (else 400).")
    max_tokens: int = Field(256, ge=1, description="Largest max_tokens a request may ask for (else 400).")
    default_max_tokens: int = Field(64, ge=1, description="New tokens generated when a request names no max_tokens.")
    max_batch: int = Field(
        8,
        ge=1,
        description="Requests generated together, sharing each forward pass (continuous batching, "
        "llmops.serving.engine); more wait for a slot. Its KV cache holds max_batch requests of max_prompt_tokens + "
        "max_tokens tokens.",
    )
    max_queue: int = Field(
        16,
        ge=0,
        description="Requests (prompts) that may wait for a generation slot beside the max_batch generating; "
        "more get 503 with Retry-After.",
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1000, description="Largest request body in bytes, counted as it arrives (else 413)."
    )
    max_prompts: int = Field(16, ge=1, description="Most prompts in one /v1/completions request (else 400).")
    max_turns: int = Field(64, ge=1, description="Most messages in one chat conversation (else 400).")
    max_correction_chars: int = Field(
        8000, ge=1, description="Longest correction /v1/feedback accepts, in characters (else 400)."
    )
    feedback_per_minute: int = Field(
        60, ge=1, description="Feedback requests one key may send per minute; more get 429 with Retry-After."
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServeParams:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not be above max_tokens")
        return self


class Params(Section):
    """The whole of `params.yaml`."""

    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    bootstrap: BootstrapParams = BootstrapParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    finetune: FinetuneParams = FinetuneParams()
    merge: MergeParams = MergeParams()
    quantize: QuantizeParams = QuantizeParams()
    evaluate: EvaluateParams = EvaluateParams()
    gate: GateParams = GateParams()
    registry: RegistryParams = RegistryParams()
    tracking: TrackingParams = TrackingParams()
    monitor: MonitorParams = MonitorParams()
    loop: LoopParams = LoopParams()
    deploy: DeployParams = DeployParams()
    serve: ServeParams = ServeParams()
    work_dir: Path = Field(Path("work"), description="Where stage outputs of each run are written.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def digest(self) -> str:
        """A short stable hash of the effective config, recorded as lineage."""
        text = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_params(path: Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read `params.yaml`, apply dotted-key overrides, validate, and anchor relative paths at the file.

    Raises:
        LLMOpsError: the file is missing or not YAML, an override names no field, or a value is invalid.
    """
    if not path.is_file():
        raise LLMOpsError(f"Config file {path} not found. Run from the project root or pass --params FILE.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LLMOpsError(f"{path} is not valid YAML: {exc}. Fix the file and run again.") from None
    if not isinstance(raw, dict):
        raise LLMOpsError(f"{path} must be a mapping of sections (model:, data:, finetune:, ...).")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise LLMOpsError(
            f"Invalid parameters in {path} (with overrides {overrides or {}}): {problems}. "
            "Fix the value in params.yaml or in --set."
        ) from None
    return _resolve(params, path.resolve().parent, set(overrides or {}))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `["finetune.lr=1e-4", ...]` into `{"finetune.lr": 1e-4}`; values are parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LLMOpsError(f"--set expects key=value (for example finetune.learning_rate=1e-4), got {pair!r}.")
        overrides[key.strip()] = _parse_value(value)
    return overrides


def _parse_value(text: str) -> Any:
    """YAML scalars, except that `1e-4` is a number (YAML 1.1 would read it as a string)."""
    if _SCIENTIFIC.fullmatch(text.strip()):
        return float(text)
    return yaml.safe_load(text) if text else ""


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LLMOpsError(f"Cannot set {key}: {part} is a value, not a section.")
        node = child
    node[leaf] = value


def _resolve(params: Params, root: Path, overridden: set[str] = frozenset()) -> Params:
    """Anchor relative paths at the folder holding params.yaml (so any cwd works) and apply the
    deployment environment: LLMOPS_TRACKING_URI, LLMOPS_ARTIFACT_LOCATION, LLMOPS_REGISTERED_MODEL. An explicit
    override of the same key (`--set registry.model_name=...`, a reproduction's own name) wins over them.

    Not MLFLOW_TRACKING_URI: MLflow itself exports that variable whenever a process sets a tracking URI,
    so in a long-lived worker it would carry one run's store into the next."""

    def anchored(p: Path) -> Path:
        return p if p.is_absolute() else root / p

    base = params.model.base
    if (root / base).exists() or base.startswith((".", "/")) or base == ModelParams().base:
        base = str(anchored(Path(base)))

    def from_env(variable: str, key: str, value: str) -> str:
        return value if key in overridden else os.environ.get(variable, value)

    uri = from_env("LLMOPS_TRACKING_URI", "tracking.uri", params.tracking.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{anchored(Path(uri.removeprefix('sqlite:///')))}"
    artifact_location = from_env(
        "LLMOPS_ARTIFACT_LOCATION", "tracking.artifact_location", params.tracking.artifact_location
    )
    if "://" not in artifact_location:
        artifact_location = anchored(Path(artifact_location)).as_uri()
    return params.model_copy(
        update={
            "model": params.model.model_copy(update={"base": base}),
            "data": params.data.model_copy(
                update={
                    "train": anchored(params.data.train),
                    "eval": anchored(params.data.eval),
                    "chat_template": params.data.chat_template and anchored(params.data.chat_template),
                }
            ),
            "finetune": _anchor_hostfile(params.finetune, anchored),
            "monitor": params.monitor.model_copy(update={"incoming": anchored(params.monitor.incoming)}),
            "tracking": params.tracking.model_copy(update={"uri": uri, "artifact_location": artifact_location}),
            "registry": RegistryParams(
                model_name=from_env("LLMOPS_REGISTERED_MODEL", "registry.model_name", params.registry.model_name)
            ),
            "work_dir": anchored(params.work_dir),
        }
    )


def _anchor_hostfile(finetune: FinetuneParams, anchored: Callable[[Path], Path]) -> FinetuneParams:
    hostfile = finetune.distributed.hostfile
    if hostfile is None:
        return finetune
    distributed = finetune.distributed.model_copy(update={"hostfile": anchored(hostfile)})
    return finetune.model_copy(update={"distributed": distributed})


def dvc_stage_args(stage: str) -> tuple[Params, Path]:
    """For a stage's `main()` run by `dvc repro`: the params (from --params) and the stage's output folder."""
    import argparse

    parser = argparse.ArgumentParser(description=f"The {stage} stage of the retrain pipeline (see dvc.yaml).")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    params = load_params(parser.parse_args().params)
    return params, params.work_dir / "dvc" / stage
