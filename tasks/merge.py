"""Fold the adapter into the full-precision base, in one copy of the model, and prove the fold changed nothing
that matters.

The base is always loaded in full precision (fp32), also after QLoRA: merging into 4-bit weights would round
the adapter's update away. The merged model is saved in fp32 too, also for a bf16 base: rounding W + BA to
bf16 moves every weight by up to 2^-9 of its size, which can be as large as the update itself. Only one copy
is ever in memory: the adapter model's logits on a few eval prompts are kept (a few MB), then the adapter is
folded into that same model in place and run again. The check compares the two in fp32 with bounds that
scale with the model: greedy next-token agreement, the largest logit difference relative to the logits' own
spread, and the KL divergence of the next-token distributions. An absolute logit tolerance cannot do this:
float noise grows with depth and logit magnitude, while a real fault (a dropped layer, a wrong scaling)
moves the logits by a sizeable fraction of their spread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from llmops.chat import render_prompt
from llmops.config import MergeParams, ModelParams, dvc_stage_args
from llmops.data import DatasetRef, Turn, read_conversations
from llmops.devices import DeviceChoice, resolve_placement
from llmops.errors import LLMOpsError
from llmops.files import atomic_dir, load_result, save_result, write_stage_metadata
from llmops.modeling import load_model, load_tokenizer
from tasks.finetune import FinetuneResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class Fidelity(BaseModel, frozen=True):
    """How closely a merged model reproduces the adapter model, over every position of the check prompts."""

    positions: int
    token_agreement: float  # share of positions whose greedy next token is the same
    max_relative_error: float  # max |logit difference| / std of the adapter model's logits, per position
    mean_kl: float  # KL(adapter || merged) of the next-token distributions, nats, mean over positions
    max_logit_diff: float  # the absolute figure, for reference: it grows with depth and logit magnitude

    def problems(self, params: MergeParams) -> list[str]:
        """What breaks the bounds in `params`, in words; empty when the merge is faithful."""
        found = []
        if self.token_agreement < params.min_token_agreement:
            found.append(
                f"greedy next-token agreement {self.token_agreement:.4f} < merge.min_token_agreement="
                f"{params.min_token_agreement:g}"
            )
        if self.max_relative_error > params.max_relative_error:
            found.append(
                f"relative logit error {self.max_relative_error:.3g} > merge.max_relative_error="
                f"{params.max_relative_error:g}"
            )
        if self.mean_kl > params.max_kl:
            found.append(f"mean KL divergence {self.mean_kl:.3g} > merge.max_kl={params.max_kl:g}")
        return found


class MergeResult(BaseModel, frozen=True):
    model_dir: Path
    fidelity: Fidelity


class MergeFidelityError(LLMOpsError):
    """The merged model does not reproduce the adapter model's outputs."""

    exit_code = 1


@torch.no_grad()
def prompt_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Sequence[Turn] | str]
) -> list[torch.Tensor]:
    """The model's fp32 logits at every position of each rendered prompt."""
    logits = []
    for prompt in prompts:
        ids = torch.tensor([render_prompt(tokenizer, prompt)], device=model.device)
        logits.append(model(input_ids=ids).logits[0].float().cpu())
    return logits


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> Fidelity:
    """Fidelity of `candidate` to `reference` (per-prompt logits of the same prompts), computed in fp32."""
    ref, cand = torch.cat(reference).double(), torch.cat(candidate).double()
    diff = (cand - ref).abs()
    spread = ref.std(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return Fidelity(
        positions=ref.shape[0],
        token_agreement=(ref.argmax(-1) == cand.argmax(-1)).double().mean().item(),
        max_relative_error=(diff.amax(-1) / spread).max().item(),
        mean_kl=kl.clamp_min(0).mean().item(),
        max_logit_diff=diff.max().item(),
    )


def merge_adapter(
    params: MergeParams,
    base_model: str | ModelParams,
    adapter: FinetuneResult,
    data: DatasetRef,
    out: Path,
    device: DeviceChoice = "auto",
) -> MergeResult:
    """Merge `adapter` into `base_model` and save the result (weights, generation config, tokenizer with its
    chat template) to `out`, after checking the saved weights reproduce the adapter model. It runs in float32
    on the policy's device (model.device).

    Raises:
        MergeFidelityError: the merged weights do not reproduce the adapter model within `params`' bounds.
    """
    from peft import PeftModel  # here, not at the top: seconds of imports that a cached merge never needs

    base = base_model if isinstance(base_model, ModelParams) else ModelParams(base=base_model)
    base_model, options = base.base, {"revision": base.revision, "trust_remote_code": base.trust_remote_code}
    tokenizer = load_tokenizer(base_model, data.chat_template, **options)  # saved with the model: serving renders alike
    prompts = [conversation.prompt for conversation in read_conversations(data.eval)[: params.check_prompts]]
    where = resolve_placement(device).device
    model = PeftModel.from_pretrained(load_model(base_model, device=where, **options), adapter.adapter_dir).eval()
    reference = prompt_logits(model, tokenizer, prompts)
    merged = model.merge_and_unload()  # folds each adapter into its layer's weight, in place
    fidelity = compare_logits(reference, prompt_logits(merged, tokenizer, prompts))
    log.info(
        "merge fidelity over %d positions: greedy agreement %.4f, relative logit error %.2e, mean KL %.2e "
        "(max |logit difference| %.2e)",
        fidelity.positions,
        fidelity.token_agreement,
        fidelity.max_relative_error,
        fidelity.mean_kl,
        fidelity.max_logit_diff,
    )
    if problems := fidelity.problems(params):
        raise MergeFidelityError(
            f"The merged model does not reproduce the adapter model: {'; '.join(problems)}, over "
            f"{fidelity.positions} positions of {len(prompts)} eval prompts. The merge is wrong; the adapter at "
            f"{adapter.adapter_dir} is kept for inspection."
        )
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)  # in fp32, with generation_config.json
        tokenizer.save_pretrained(tmp)  # with the chat template
        write_stage_metadata(
            tmp,
            "merge",
            params,
            base_model=base_model,
            revision=base.revision,
            adapter=str(adapter.adapter_dir),
            fidelity=fidelity.model_dump(),
        )
    return MergeResult(model_dir=out, fidelity=fidelity)


def main() -> None:
    """DVC stage `merge`."""
    params, out = dvc_stage_args("merge")
    data = load_result(DatasetRef, out.with_name("validate"))
    adapter = load_result(FinetuneResult, out.with_name("finetune"))
    save_result(merge_adapter(params.merge, params.model, adapter, data, out, params.model.device), out)


if __name__ == "__main__":
    main()
