"""Fold the adapter into the full-precision base, and prove the fold changed nothing.

The base is always loaded in full precision, also after QLoRA: merging into 4-bit weights would round
the adapter's update away. The fidelity check compares the adapter model (base + unmerged adapter) with
the merged model on eval prompts; any difference beyond the tolerance fails the stage.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peft import PeftModel
from pydantic import BaseModel

from llmops.config import MergeParams, dvc_stage_args
from llmops.data import DatasetRef, read_conversations
from llmops.devices import DeviceChoice, resolve_placement
from llmops.errors import LLMOpsError
from llmops.files import atomic_dir, load_result, save_result, write_stage_metadata
from llmops.modeling import load_model, load_tokenizer, max_logit_difference
from tasks.finetune import FinetuneResult

log = logging.getLogger(__name__)


class MergeResult(BaseModel, frozen=True):
    model_dir: Path
    max_logit_diff: float


class MergeFidelityError(LLMOpsError):
    """The merged model does not reproduce the adapter model's outputs."""

    exit_code = 1


def merge_adapter(
    params: MergeParams,
    base_model: str,
    adapter: FinetuneResult,
    data: DatasetRef,
    out: Path,
    device: DeviceChoice = "auto",
) -> MergeResult:
    """Merge `adapter` into `base_model` and save the result (weights + tokenizer) to `out`, in float32 on the
    policy's device (model.device)."""
    tokenizer = load_tokenizer(base_model, data.chat_template)  # saved with the model: serving renders alike
    where = resolve_placement(device).device
    adapted = PeftModel.from_pretrained(load_model(base_model, device=where), adapter.adapter_dir).eval()
    # merge_and_unload folds the weights of `adapted` in place, so the reference is a second copy.
    merged = PeftModel.from_pretrained(load_model(base_model, device=where), adapter.adapter_dir)
    merged = merged.merge_and_unload().eval()
    prompts = [conversation.prompt for conversation in read_conversations(data.eval)[: params.check_prompts]]
    diff = max_logit_difference(adapted, merged, tokenizer, prompts)
    log.info("merge fidelity: max |logit difference| %.2e over %d prompts", diff, len(prompts))
    if diff > params.tolerance:
        raise MergeFidelityError(
            f"Merged model differs from the adapter model by up to {diff:.3g} in logits, above "
            f"merge.tolerance={params.tolerance}. The merge is wrong; the adapter at {adapter.adapter_dir} "
            "is kept for inspection."
        )
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_stage_metadata(
            tmp, "merge", params, base_model=base_model, adapter=str(adapter.adapter_dir), max_logit_diff=diff
        )
    return MergeResult(model_dir=out, max_logit_diff=diff)


def main() -> None:
    """DVC stage `merge`."""
    params, out = dvc_stage_args("merge")
    data = load_result(DatasetRef, out.with_name("validate"))
    adapter = load_result(FinetuneResult, out.with_name("finetune"))
    save_result(merge_adapter(params.merge, params.model.base, adapter, data, out, params.model.device), out)


if __name__ == "__main__":
    main()
