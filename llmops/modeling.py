"""What every stage shares about the model: loading, the prompt format, tokenization with loss masking,
perplexity and greedy generation. Real Hugging Face loading code, for a local folder or a hub id."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from llmops.data import Example
from llmops.errors import LLMOpsError

PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"
IGNORE_INDEX = -100  # label value the loss skips: prompt tokens and padding
EVAL_MAX_SEQ_LEN = 512  # long enough that evaluation never truncates a demo or typical instruction row


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def load_tokenizer(
    name_or_path: str | Path, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise _not_found(name_or_path, exc) from None
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
    """Load a causal LM in `dtype` (float32 by default, on the CPU), or in NF4 4-bit (bitsandbytes) for QLoRA
    with `dtype` as the compute type.

    A checkpoint that is already quantized (GPTQ) loads with the quantization its config records; passing
    any `quantization_config`, even None, would override that and silently drop the packed weights.
    `revision` pins a hub id to a tag or commit; `trust_remote_code` lets a checkpoint run its own code.
    """
    options: dict = {"dtype": dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    if device is not None:
        options["device_map"] = {"": device}
    if quantization == "nf4":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    try:
        model_class = _loader_class(name_or_path, revision, trust_remote_code)
        model = model_class.from_pretrained(str(name_or_path), **options)
    except OSError as exc:
        raise _not_found(name_or_path, exc) from None
    return model.eval()


def _loader_class(name_or_path: str | Path, revision: str | None, trust_remote_code: bool) -> type:
    """AutoModelForCausalLM, except for a GPTQ checkpoint of a transformers architecture: its class, told
    that the blocks holding packed layers need no weight initialization. Some architectures' initializers
    reach into a layer's `.weight` (GPT-2's attention and MLP: `c_proj.weight`), which a packed layer does not
    have (`qweight`), and every packed weight comes from the checkpoint anyway. (The quantize stage checks
    that no parameter was missing from it.)"""
    config = AutoConfig.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None) or {}
    if quantization.get("quant_method") != "gptq" or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def _initialize_missing_keys(self, is_quantized: bool) -> None:
        for module in self.modules():
            if any(hasattr(child, "qweight") for child in module.children()):
                module._is_hf_initialized = True  # transformers' own flag: skip this module's initializer
        base._initialize_missing_keys(self, is_quantized)

    return type(base.__name__, (base,), {"_initialize_missing_keys": _initialize_missing_keys})


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


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_seq_len: int) -> dict:
    """Token ids of prompt + response + EOS, with labels masked to the response and EOS only.

    Truncation cuts the end, so a long prompt can leave no supervised token: such rows come back with
    every label masked, and the caller decides what to do with them.
    """
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = prefix + tokenizer(format_prompt(example.prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
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


@torch.no_grad()
def response_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_seq_len: int,
    batch_size: int = 16,
) -> float:
    """Perplexity of the responses (and EOS) given their prompts: the quantity fine-tuning minimises."""
    total_loss, total_tokens = 0.0, 0
    encoded = [encode_example(tokenizer, example, max_seq_len) for example in examples]
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
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
        raise LLMOpsError("No response tokens left to score: raise finetune.max_seq_len or shorten prompts.")
    return math.exp(total_loss / total_tokens)


@dataclass(frozen=True)
class Generation:
    text: str
    stopped_at_eos: bool


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Every token that ends a generation: the tokenizer's EOS and each id in the model's
    generation_config.eos_token_id (a list for Llama-3 and Qwen style chat models, such as `<|im_end|>`)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[Generation]:
    """Greedy completions of formatted prompts, decoded without the prompt."""
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    prefix = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
    generations: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        texts = [prefix + format_prompt(p) for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer, model),
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            stopped = tokenizer.eos_token_id in row
            kept = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            generations.append(Generation(tokenizer.decode(kept, skip_special_tokens=True).strip(), stopped))
    return generations


@torch.no_grad()
def max_logit_difference(
    model_a: PreTrainedModel, model_b: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> float:
    """Largest absolute difference between the two models' logits over the given prompts."""
    worst = 0.0
    for prompt in prompts:
        ids = tokenizer(format_prompt(prompt), return_tensors="pt")["input_ids"]
        diff = (model_a(input_ids=ids).logits.float() - model_b(input_ids=ids).logits.float()).abs().max()
        worst = max(worst, diff.item())
    return worst


def folder_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
