"""GPTQ 4-bit quantization of the merged model, through transformers' GPTQConfig (optimum + GPTQModel).

Every linear (or GPT-2 Conv1D) layer of the transformer blocks is quantized, except those the packed format
cannot hold (a width not a multiple of 32, or an input width the group size does not divide): those stay in
full precision and are listed in the result. The quantized folder is only published after it has been loaded
back from disk with every parameter found in the checkpoint, and has generated, so the deployable artifact
is known to work. `quantize.method: none` deploys the merged model unchanged.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPTQConfig
from transformers.core_model_loading import WeightConverter, rename_source_key
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from llmops.chat import render
from llmops.config import QuantizeParams, dvc_stage_args
from llmops.data import Conversation, DatasetRef, Turn, read_conversations
from llmops.devices import DeviceChoice, DtypeChoice, Placement, resolve_placement
from llmops.errors import LLMOpsError
from llmops.files import atomic_dir, load_result, save_result, write_stage_metadata
from llmops.modeling import (
    EVAL_MAX_SEQ_LEN,
    folder_size_bytes,
    generate,
    load_model,
    load_tokenizer,
    response_perplexity,
)
from tasks.merge import MergeResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

CALIBRATION_NEW_TOKENS = 128  # the longest answer the merged model writes to top up a small calibration set


class QuantizeResult(BaseModel, frozen=True):
    model_dir: Path
    method: str
    size_bytes: int
    merged_size_bytes: int
    perplexity: float
    merged_perplexity: float
    full_precision_layers: list[str] = []  # block layers GPTQ cannot pack, kept unquantized (relative names)
    calibration_rows: int = 0
    generated_calibration_rows: int = 0  # of those, written by the merged model (a small training set)

    @property
    def perplexity_ratio(self) -> float:
        """Quantized over merged perplexity on the eval split: 1.0 means no quality lost."""
        return self.perplexity / self.merged_perplexity


def quantize_model(
    params: QuantizeParams,
    merged: MergeResult,
    data: DatasetRef,
    out: Path,
    device: DeviceChoice = "auto",
    dtype: DtypeChoice = "auto",
) -> QuantizeResult:
    """Quantize `merged.model_dir` into `out` (or pass it through when the method is `none`), on the device
    policy's device and type (model.device, model.dtype); both perplexities are measured there."""
    placement = resolve_placement(device, dtype)
    tokenizer = load_tokenizer(merged.model_dir)
    eval_examples = read_conversations(data.eval)
    merged_model = load_model(merged.model_dir, dtype=placement.dtype, device=placement.device)
    merged_ppl = response_perplexity(merged_model, tokenizer, eval_examples, EVAL_MAX_SEQ_LEN)
    merged_size = folder_size_bytes(merged.model_dir)
    if params.method == "none":
        return QuantizeResult(
            model_dir=merged.model_dir,
            method="none",
            size_bytes=merged_size,
            merged_size_bytes=merged_size,
            perplexity=merged_ppl,
            merged_perplexity=merged_ppl,
        )

    to_quantize, full_precision = packable_block_layers(merged_model, params.group_size)
    if full_precision:
        log.warning("GPTQ cannot pack %s: they stay in full precision", ", ".join(full_precision))
    if not to_quantize:
        raise LLMOpsError(
            f"No layer of {merged.model_dir} can be GPTQ-packed (every width must be a multiple of 32 and of "
            f"quantize.group_size={params.group_size}). Set quantize.method: none to deploy the merged model."
        )
    calibration, generated = calibration_set(
        merged_model, tokenizer, read_conversations(data.train), params.calibration_samples
    )
    del merged_model
    config = GPTQConfig(
        bits=params.bits,
        group_size=params.group_size,
        dataset=calibration,
        tokenizer=tokenizer,
        desc_act=params.act_order,
        # Listing the layers is what keeps the others in full precision; one group per layer keeps GPTQ's
        # sequential order (each layer calibrated on the already-quantized outputs of those before it).
        modules_in_block_to_quantize=[[name] for name in to_quantize] if full_precision else None,
        backend=placement.gptq_packing_kernel,
    )
    with atomic_dir(out) as tmp:
        try:
            quantized = AutoModelForCausalLM.from_pretrained(
                str(merged.model_dir),
                quantization_config=config,
                dtype=placement.dtype,
                device_map={"": placement.device},
            )
        except (ValueError, RuntimeError) as exc:
            raise LLMOpsError(
                f"GPTQ quantization of {merged.model_dir} failed: {exc}. Check quantize.bits and "
                "quantize.group_size (the group size must divide every layer's input width), or set "
                "quantize.method: none."
            ) from None
        quantized.config.quantization_config.dataset = None  # the calibration token ids: not for config.json
        quantized.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del quantized
        reloaded = reload_complete(tmp, placement)
        sample = generate(reloaded, tokenizer, [eval_examples[0].prompt], max_new_tokens=8)[0]
        log.info("quantized model reloaded and generated %r", sample.text)
        result = QuantizeResult(
            model_dir=out,
            method="gptq",
            size_bytes=folder_size_bytes(tmp),
            merged_size_bytes=merged_size,
            perplexity=response_perplexity(reloaded, tokenizer, eval_examples, EVAL_MAX_SEQ_LEN),
            merged_perplexity=merged_ppl,
            full_precision_layers=full_precision,
            calibration_rows=len(calibration),
            generated_calibration_rows=generated,
        )
        write_stage_metadata(
            tmp,
            "quantize",
            params,
            merged_model=str(merged.model_dir),
            perplexity_ratio=result.perplexity_ratio,
            **result.model_dump(mode="json"),
        )
    log.info(
        "GPTQ %d-bit, calibrated on %d rows (%d written by the merged model): %.1f MB -> %.1f MB, perplexity "
        "%.3f -> %.3f",
        params.bits,
        result.calibration_rows,
        result.generated_calibration_rows,
        merged_size / 1e6,
        result.size_bytes / 1e6,
        merged_ppl,
        result.perplexity,
    )
    return result


def calibration_set(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: list[Conversation], samples: int
) -> tuple[list[dict], int]:
    """GPTQ's calibration rows, token for token as training renders them (the layers are calibrated on the
    activations they will see), and how many of them the model wrote itself.

    Training rows, sampled with a fixed seed. A training set smaller than `samples` is topped up with its own
    prompts answered again by the merged model, sampled (seeded): a team's first small set still calibrates
    every layer on enough tokens of what the model will serve. (SmolLM2-135M trained on 20 conversations:
    perplexity 1.081x the merged model's calibrated on the 20 alone, 1.053x topped up to 128; `make bench`.)"""
    rows = random.Random(0).sample(train, min(samples, len(train)))
    prompts = [train[i % len(train)].prompt for i in range(samples - len(rows))]
    written: list[Conversation] = []
    if prompts:
        torch.manual_seed(0)
        answers = generate(model, tokenizer, prompts, CALIBRATION_NEW_TOKENS, sample=True)
        written = [
            Conversation((*prompt, Turn("assistant", answer.text)))
            for prompt, answer in zip(prompts, answers, strict=True)
            if answer.text.strip()
        ]
    calibration = []
    for row in rows + written:
        ids = render(tokenizer, row, EVAL_MAX_SEQ_LEN)[0]
        calibration.append({"input_ids": [ids], "attention_mask": [[1] * len(ids)]})
    return calibration, len(written)


def packable_block_layers(model: PreTrainedModel, group_size: int) -> tuple[list[str], list[str]]:
    """The block layers (names relative to a block: `self_attn.q_proj`, `attn.c_attn`) GPTQ can pack, and
    those it cannot: the packed kernels need both widths to be multiples of 32, and the input width to be a
    multiple of the group size. A name is packable only if it is in every block."""
    # Here, not above: importing optimum.gptq loads GPTQModel (seconds, and a banner), which a cached run skips.
    from optimum.gptq.utils import get_block_name_with_pattern, get_layers

    prefix = get_block_name_with_pattern(model)
    widths: dict[str, set[tuple[int, int]]] = {}
    for name, layer in get_layers(model, prefix=prefix).items():
        relative = name.removeprefix(prefix).lstrip(".").split(".", 1)[1]  # drop the block index
        shape = tuple(layer.weight.shape)
        in_out = (shape[0], shape[1]) if not isinstance(layer, torch.nn.Linear) else (shape[1], shape[0])
        widths.setdefault(relative, set()).add(in_out)

    def packable(in_features: int, out_features: int) -> bool:
        return in_features % 32 == 0 and out_features % 32 == 0 and (group_size == -1 or in_features % group_size == 0)

    ok = [name for name, shapes in widths.items() if all(packable(*shape) for shape in shapes)]
    return ok, [name for name in widths if name not in ok]


def reload_complete(folder: Path, placement: Placement | None = None) -> PreTrainedModel:
    """Load a saved model back and check that the checkpoint held every parameter and persistent buffer of
    the loaded model: one it lacked was newly (randomly) initialized by the loader, a silent corruption.

    Raises:
        LLMOpsError: a parameter or buffer of the reloaded model is not in the checkpoint.
    """
    placement = placement or resolve_placement()
    reloaded = load_model(folder, dtype=placement.dtype, device=placement.device)
    state = reloaded.state_dict()
    saved: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            keys = handle.keys()
        saved |= {_loaded_name(reloaded, key, state) for key in keys}
    saved_storage = {state[key].data_ptr() for key in saved if key in state}  # tied weights are saved once
    missing = sorted(key for key, t in state.items() if key not in saved and t.data_ptr() not in saved_storage)
    if missing:
        raise LLMOpsError(
            f"The model saved in {folder} does not reload as it was saved: {len(missing)} parameter(s) missing from "
            f"the checkpoint were newly initialized ({', '.join(missing[:6])}). Its weights cannot be trusted; set "
            "quantize.method: none to deploy the merged model."
        )
    return reloaded


def _loaded_name(model: PreTrainedModel, checkpoint_key: str, state: dict[str, torch.Tensor]) -> str:
    """A checkpoint key under the name the loader gave it, through the key renames it applied to this model
    (GPT-NeoX's checkpoints hold its `lm_head` as `embed_out`). Only the renames the loader used count, so a
    key it did not map stays unmatched, and the parameter it should have filled is reported missing."""
    applied = getattr(model, "_weight_conversions", None) or []
    converters = [t for t in applied if isinstance(t, WeightConverter)]
    renamings = [t for t in applied if not isinstance(t, WeightConverter)]
    return rename_source_key(checkpoint_key, renamings, converters, model.base_model_prefix, state)[0]


def main() -> None:
    """DVC stage `quantize`."""
    params, out = dvc_stage_args("quantize")
    data = load_result(DatasetRef, out.with_name("validate"))
    merged = load_result(MergeResult, out.with_name("merge"))
    result = quantize_model(params.quantize, merged, data, out, params.model.device, params.model.dtype)
    out.mkdir(exist_ok=True)  # `method: none` writes no model of its own; the result still records the choice
    save_result(result, out)


if __name__ == "__main__":
    main()
