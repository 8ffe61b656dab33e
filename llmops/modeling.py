"""What every stage shares about the model: loading, batching rendered conversations, perplexity and greedy
generation. Real Hugging Face loading code, for a local folder or a hub id. Prompts and loss masks come from
the one rendering in `llmops.chat`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GPTQConfig,
)
from transformers.generation.streamers import BaseStreamer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from llmops.chat import IGNORE_INDEX, end_of_turn_ids, render, render_prompt
from llmops.data import Conversation, Turn
from llmops.devices import GPTQ_KERNELS
from llmops.errors import LLMOpsError
from llmops.files import write_json

if TYPE_CHECKING:  # importing it loads all of transformers' modelling code: seconds a cached run never needs
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Evaluation scores whole conversations: the validate stage already fit every row to finetune.max_seq_len.
EVAL_MAX_SEQ_LEN = 4096


def load_tokenizer(
    name_or_path: str | Path,
    chat_template: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """The model's tokenizer; `chat_template` (data.chat_template's text) replaces its own template."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise _not_found(name_or_path, exc) from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.eos_token_id is None:
        raise LLMOpsError(f"Tokenizer of {name_or_path} has no EOS token; generations could never stop.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path,
    quantization: str = "none",
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in `dtype` on `device` (float32 on the CPU by default; stages pass the device policy,
    `llmops.devices.resolve_placement`), or in NF4 4-bit (bitsandbytes) for QLoRA with `dtype` as the compute
    type.

    A checkpoint that is already quantized (GPTQ) loads with the quantization its config records; only the
    kernel is chosen here, the fastest on this host (`gptq_kernel`): transformers keeps the checkpoint's config
    and takes just the loading attributes from the one passed. `revision` pins a hub id to a tag or commit;
    `trust_remote_code` lets a checkpoint run its own code.
    """
    options: dict = {"dtype": dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    if device is not None:
        options["device_map"] = {"": device}
    if quantization == "nf4":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    try:
        config = AutoConfig.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=trust_remote_code)
        recorded = getattr(config, "quantization_config", None)
        if isinstance(recorded, dict) and recorded.get("quant_method") == "gptq" and quantization == "none":
            kernel = gptq_kernel(name_or_path, config, dtype, device or "cpu", revision, trust_remote_code)
            options["quantization_config"] = GPTQConfig(bits=recorded["bits"], backend=kernel)
        model = _from_pretrained(name_or_path, config, options)
    except OSError as exc:
        raise _not_found(name_or_path, exc) from None
    return model.eval()


def _from_pretrained(name_or_path: str | Path, config, options: dict) -> PreTrainedModel:
    with warnings.catch_warnings():
        # Passing the GPTQ kernel is how transformers takes a loading attribute; it warns that it does.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return _loader_class(config).from_pretrained(str(name_or_path), **options)


# Where each host keeps the GPTQ kernel it measured fastest per model shape (`gptq_kernel`).
KERNEL_CHOICES = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmops" / "gptq-kernels.json"


def gptq_kernel(
    name_or_path: str | Path,
    config,
    dtype: torch.dtype,
    device: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> str:
    """The fastest GPTQ kernel on this host for a checkpoint of this shape, measured.

    Each of the device's candidates (`llmops.devices.GPTQ_KERNELS`) loads the checkpoint and decodes the same
    tokens greedily at batch 1 and at batch 8, a serving host's two cases (best of three, after an untimed pass
    in which kernels repack and compile); the least time wins. A kernel this host cannot build or run is
    skipped. The choice is kept per host, model shape, device and library versions in `KERNEL_CHOICES`, so a
    model is measured once, at its first load (the quantize stage's check), not at every load.
    """
    kind = "cuda" if device.startswith("cuda") else "cpu"
    shape = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    where = torch.cuda.get_device_name(device) if kind == "cuda" else f"{torch.get_num_threads()} threads"
    identity = [shape, str(dtype), kind, where, socket.gethostname(), torch.__version__, version("gptqmodel")]
    key = hashlib.sha256(json.dumps([identity, GPTQ_KERNELS[kind]], sort_keys=True, default=str).encode()).hexdigest()
    try:
        choices = json.loads(KERNEL_CHOICES.read_text())
    except (OSError, ValueError):  # none measured yet on this host (or a half-written file: measure again)
        choices = {}
    if key in choices:
        return choices[key]["kernel"]
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    for kernel in GPTQ_KERNELS[kind]:
        try:
            quantization = GPTQConfig(bits=config.quantization_config["bits"], backend=kernel)
            options = {"dtype": dtype, "device_map": {"": device}, "quantization_config": quantization}
            options |= {"revision": revision, "trust_remote_code": trust_remote_code}
            seconds[kernel] = _decode_seconds(_from_pretrained(name_or_path, config, options).eval())
        except Exception as exc:  # noqa: BLE001 - a kernel this host cannot build or run: the next one may
            failed[kernel] = " ".join(str(exc).split())[:300] or type(exc).__name__
    if not seconds:
        raise LLMOpsError(
            f"No GPTQ kernel runs {name_or_path} on {kind} here: "
            + "; ".join(f"{k}: {why}" for k, why in failed.items())
            + ". Set quantize.method: none to deploy the merged model."
        )
    chosen = min(seconds, key=seconds.get)
    log.info(
        "GPTQ kernel for %s on %s (%s): %s, measured %s%s",
        config.model_type,
        kind,
        where,
        chosen,
        ", ".join(f"{k} {s:.2f} s" for k, s in seconds.items()),
        "".join(f"; {k} cannot run here ({why})" for k, why in failed.items()),
    )
    choices[key] = {"kernel": chosen, "seconds": seconds, "failed": failed, "model_type": config.model_type}
    KERNEL_CHOICES.parent.mkdir(parents=True, exist_ok=True)
    partial = KERNEL_CHOICES.with_name(f"{KERNEL_CHOICES.name}.{os.getpid()}")
    write_json(partial, choices)
    partial.replace(KERNEL_CHOICES)  # atomic: another process reads the old file or this one, never half
    return chosen


@torch.inference_mode()
def _decode_seconds(model: PreTrainedModel, prompt_tokens: int = 32, new_tokens: int = 8) -> float:
    """Seconds to decode `new_tokens` greedily after a `prompt_tokens` prompt, at batch 1 plus at batch 8."""
    total = 0.0
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    for batch in (1, 8):
        ids = (torch.arange(batch * prompt_tokens) % model.config.vocab_size).view(batch, prompt_tokens)
        ids = ids.to(model.device)
        model.generate(ids, attention_mask=torch.ones_like(ids), **options)  # untimed: kernels repack, compile
        times = []
        for _ in range(3):
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **options)
            times.append(time.perf_counter() - start)
        total += min(times)
    return total


def _loader_class(config) -> type:
    """AutoModelForCausalLM, except for a GPTQ checkpoint of a transformers architecture: its class, told
    that the blocks holding packed layers need no weight initialization. Some architectures' initializers
    reach into a layer's `.weight` (GPT-2's attention and MLP: `c_proj.weight`), which a packed layer does not
    have (`qweight`), and every packed weight comes from the checkpoint anyway. (The quantize stage checks
    that no parameter was missing from it.)

    The subclass is still the library's architecture, not custom code: transformers applies its checkpoint key
    renames (GPT-NeoX saves its `lm_head` as `embed_out`) only to classes it does not take for custom code."""
    quantization = getattr(config, "quantization_config", None) or {}
    if quantization.get("quant_method") != "gptq" or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def _initialize_missing_keys(self, is_quantized: bool) -> None:
        for module in self.modules():
            if any(hasattr(child, "qweight") for child in module.children()):
                module._is_hf_initialized = True  # transformers' own flag: skip this module's initializer
        base._initialize_missing_keys(self, is_quantized)

    def is_custom_code(cls) -> bool:
        return base.is_custom_code()

    overrides = {"_initialize_missing_keys": _initialize_missing_keys, "is_custom_code": classmethod(is_custom_code)}
    return type(base.__name__, (base,), overrides)


def _not_found(name_or_path: str | Path, exc: Exception) -> LLMOpsError:
    if str(name_or_path).startswith(("/", ".")):
        return LLMOpsError(
            f"Model folder {name_or_path} does not exist or holds no model. Run `llmops bootstrap` to build the "
            "default tiny model, or set model.base in params.yaml to a model folder or a Hugging Face model id."
        )
    return LLMOpsError(
        f"Cannot load model {name_or_path}: it is not a model folder here and could not be fetched as a "
        f"Hugging Face model id ({str(exc).splitlines()[0]}). Run `llmops bootstrap` to build the default "
        "tiny model, or set model.base in params.yaml to a local model folder."
    )


def encode_conversation(tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_seq_len: int) -> dict:
    """`llmops.chat.render` as the dict the collators take: ids, and labels on assistant turns only."""
    input_ids, labels = render(tokenizer, conversation, max_seq_len)
    return {"input_ids": input_ids, "labels": labels}


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of encoded examples; padding is masked out of attention and loss."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item["input_ids"])
        input_ids[row, :length] = torch.tensor(item["input_ids"])
        labels[row, :length] = torch.tensor(item["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def response_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    max_seq_len: int,
    batch_size: int = 16,
) -> float:
    """Perplexity of the assistant turns (and their EOS) given what precedes them: what fine-tuning minimises."""
    encoded = [encode_conversation(tokenizer, conversation, max_seq_len) for conversation in conversations]
    return _perplexity(model, tokenizer, encoded, batch_size)


def prompt_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Sequence[Turn]],
    max_seq_len: int,
    batch_size: int = 16,
) -> float:
    """Perplexity of whole prompts as `render_prompt` gives them to `generate`: how familiar what users ask is."""
    encoded = []
    for prompt in prompts:
        ids = render_prompt(tokenizer, prompt)[:max_seq_len]
        encoded.append({"input_ids": ids, "labels": ids})
    return _perplexity(model, tokenizer, encoded, batch_size)


@torch.no_grad()
def _perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encoded: list[dict], batch_size: int):
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = {
            k: v.to(model.device)
            for k, v in collate(encoded[start : start + batch_size], tokenizer.pad_token_id).items()
        }
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total_loss += losses.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise LLMOpsError("No tokens left to score: raise finetune.max_seq_len or shorten prompts.")
    return math.exp(total_loss / total_tokens)


@dataclass(frozen=True)
class Generation:
    text: str
    stopped_at_eos: bool


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Every token that ends a generation: the tokenizer's EOS, the token the chat template ends an assistant
    turn with (`<end_of_turn>`, `<|end|>`: what training taught the model to say last), and each id in the
    model's generation_config.eos_token_id (a list for Llama-3 and Qwen style chat models)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer), *configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Sequence[Turn] | str],
    max_new_tokens: int,
    batch_size: int = 16,
    on_text: Callable[[str], None] | None = None,
    sample: bool = False,
) -> list[Generation]:
    """Greedy next assistant turns of conversations (a plain string is one user turn), decoded without the
    prompt. The prompt ids are `llmops.chat.render_prompt`'s: exactly those training put before an answer.
    `sample`: drawn from the model's distribution instead (its generation config's settings; seed torch first).

    `on_text`, for a single prompt, is called on this thread with each new piece of the answer as it is
    generated; the pieces join to exactly the answer's text. An exception it raises ends the generation."""
    if on_text is not None and len(prompts) != 1:
        raise ValueError(f"on_text streams the answer to one prompt; got {len(prompts)} prompts.")
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    stops = stop_token_ids(tokenizer, model)
    streamer = None if on_text is None else _TextPieces(tokenizer, stops, on_text)
    generations: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        rendered = [{"input_ids": render_prompt(tokenizer, p)} for p in prompts[start : start + batch_size]]
        batch = tokenizer.pad(rendered, return_tensors="pt", padding=True).to(model.device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
        generations += [_answer(tokenizer, row, stops) for row in output[:, batch["input_ids"].shape[1] :].tolist()]
    return generations


def _answer(tokenizer: PreTrainedTokenizerBase, new_ids: list[int], stops: list[int]) -> Generation:
    """The answer in generated ids: up to the first stop token, decoded without special tokens."""
    end = next((i for i, token in enumerate(new_ids) if token in stops), None)
    return Generation(tokenizer.decode(new_ids[:end], skip_special_tokens=True).strip(), end is not None)


class _TextPieces(BaseStreamer):
    """transformers' streamer protocol for `generate(on_text=...)`: the first `put` is the prompt, then each
    new token; `end` when generation stops. Each time, the answer so far is decoded as `_answer` decodes it,
    less its last token, which may still change with the next (a character split over tokens; spacing the
    tokenizer cleans up), and only what extends the text already sent goes out: the pieces join to exactly
    the final `Generation.text`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[int], on_text: Callable[[str], None]):
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids: list[int] | None = None  # None until the prompt has gone by
        self.sent = ""

    def put(self, value: torch.Tensor) -> None:
        if self.ids is None:
            self.ids = []
            return
        self.ids += value.reshape(-1).tolist()
        self._send(_answer(self.tokenizer, self.ids[:-1], self.stops).text.rstrip("\ufffd"))

    def end(self) -> None:
        self._send(_answer(self.tokenizer, self.ids or [], self.stops).text)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text


@torch.no_grad()
def max_logit_difference(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Sequence[Turn] | str],
) -> float:
    """Largest absolute difference between the two models' logits over the given prompts."""
    worst = 0.0
    for prompt in prompts:
        ids = torch.tensor([render_prompt(tokenizer, prompt)])
        logits_a = model_a(input_ids=ids.to(model_a.device)).logits.float()
        diff = (logits_a - model_b(input_ids=ids.to(model_b.device)).logits.float().to(logits_a.device)).abs().max()
        worst = max(worst, diff.item())
    return worst


def folder_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
