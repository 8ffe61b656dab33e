"""GPTQ 4-bit quantization of the merged model, through transformers' GPTQConfig (optimum + GPTQModel).

The quantized folder is only published after it has been loaded back from disk and has generated, so the
deployable artifact is known to work. `quantize.method: none` deploys the merged model unchanged.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from pydantic import BaseModel
from transformers import AutoModelForCausalLM, GPTQConfig

from llmops.chat import render
from llmops.config import QuantizeParams, dvc_stage_args
from llmops.data import DatasetRef, read_conversations
from llmops.devices import DeviceChoice, DtypeChoice, resolve_placement
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

log = logging.getLogger(__name__)


class QuantizeResult(BaseModel, frozen=True):
    model_dir: Path
    method: str
    size_bytes: int
    merged_size_bytes: int
    perplexity: float
    merged_perplexity: float

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
    del merged_model
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

    train = read_conversations(data.train)
    calibration = random.Random(0).sample(train, min(params.calibration_samples, len(train)))
    config = GPTQConfig(
        bits=params.bits,
        group_size=params.group_size,
        dataset=[tokenizer.decode(render(tokenizer, c, EVAL_MAX_SEQ_LEN)[0]) for c in calibration],  # as trained
        tokenizer=tokenizer,
        backend=placement.gptq_kernel,
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
        quantized.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del quantized
        reloaded = load_model(tmp, dtype=placement.dtype, device=placement.device)
        sample = generate(reloaded, tokenizer, [eval_examples[0].prompt], max_new_tokens=8)[0]
        log.info("quantized model reloaded and generated %r", sample.text)
        result = QuantizeResult(
            model_dir=out,
            method="gptq",
            size_bytes=folder_size_bytes(tmp),
            merged_size_bytes=merged_size,
            perplexity=response_perplexity(reloaded, tokenizer, eval_examples, EVAL_MAX_SEQ_LEN),
            merged_perplexity=merged_ppl,
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
        "GPTQ %d-bit: %.1f MB -> %.1f MB, perplexity %.3f -> %.3f",
        params.bits,
        merged_size / 1e6,
        result.size_bytes / 1e6,
        merged_ppl,
        result.perplexity,
    )
    return result


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
