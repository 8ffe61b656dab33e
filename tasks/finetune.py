"""LoRA (or QLoRA on an NF4 base) fine-tuning with the loss on response tokens only."""

from __future__ import annotations

import logging
import shutil
from functools import partial
from pathlib import Path

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from pydantic import BaseModel
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from llmops.config import FinetuneParams, dvc_stage_args
from llmops.data import read_examples
from llmops.errors import LLMOpsError
from llmops.files import atomic_dir, load_result, save_result, write_stage_metadata
from llmops.modeling import IGNORE_INDEX, collate, encode_example, load_model, load_tokenizer
from llmops.orchestration import cached_stage
from tasks.validate import DatasetRef

log = logging.getLogger(__name__)


class FinetuneResult(BaseModel, frozen=True):
    adapter_dir: Path
    steps: int
    final_loss: float
    loss_history: list[float]
    trained_rows: int
    skipped_rows: int
    supervised_tokens: int


class _ProgressBarOnly(ProgressCallback):
    """Keep the progress bar, drop the per-step loss lines: the losses go to MLflow instead."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        pass


def finetune(params: FinetuneParams, base_model: str, data: DatasetRef, out: Path) -> FinetuneResult:
    """Train a LoRA adapter on `data.train` and write it, with its config and metadata, to `out`.

    Rows whose response is cut away entirely by `max_seq_len` teach nothing (and would make the loss NaN
    in a batch of only such rows), so they are skipped and counted.
    """
    tokenizer = load_tokenizer(base_model)
    encoded = [encode_example(tokenizer, e, params.max_seq_len) for e in read_examples(data.train)]
    usable = [row for row in encoded if any(label != IGNORE_INDEX for label in row["labels"])]
    if not usable:
        raise LLMOpsError(
            f"No row of {data.train} keeps a response token within finetune.max_seq_len="
            f"{params.max_seq_len}: raise it or shorten the prompts."
        )
    if len(usable) < len(encoded):
        log.warning("skipping %d rows whose response is truncated away", len(encoded) - len(usable))

    model = load_model(base_model, params.quantization)
    if params.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=list(params.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    with atomic_dir(out) as tmp:
        steps_per_epoch = -(-len(usable) // params.batch_size)
        total_steps = max(1, round(steps_per_epoch * params.epochs))
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(tmp / "trainer"),
                per_device_train_batch_size=params.batch_size,
                max_steps=total_steps,
                learning_rate=params.learning_rate,
                lr_scheduler_type="linear",
                warmup_steps=int(total_steps * params.warmup_ratio),
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                seed=params.seed,
                data_seed=params.seed,
                use_cpu=True,
                remove_unused_columns=False,
            ),
            train_dataset=usable,
            data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id),
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_ProgressBarOnly)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        model.save_pretrained(tmp / "adapter")
        shutil.rmtree(tmp / "trainer", ignore_errors=True)  # Trainer scratch space; nothing is kept there
        result = FinetuneResult(
            adapter_dir=out / "adapter",
            steps=trainer.state.global_step,
            final_loss=losses[-1],
            loss_history=losses,
            trained_rows=len(usable),
            skipped_rows=len(encoded) - len(usable),
            supervised_tokens=sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in usable),
        )
        write_stage_metadata(
            tmp,
            "finetune",
            params,
            base_model=base_model,
            dataset=data.model_dump(mode="json"),
            **result.model_dump(mode="json", exclude={"loss_history"}),
        )
    return result


finetune_task = cached_stage(finetune)


def main() -> None:
    """DVC stage `finetune`."""
    params, out = dvc_stage_args("finetune")
    data = load_result(DatasetRef, out.with_name("validate"))
    save_result(finetune(params.finetune, params.model.base, data, out), out)


if __name__ == "__main__":
    main()
