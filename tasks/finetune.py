"""LoRA (or QLoRA on an NF4 base) fine-tuning with the loss on response tokens only."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from functools import partial
from pathlib import Path

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, set_seed
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
    resumed_from_step: int  # 0 for a fresh start
    final_loss: float
    loss_history: list[float]
    trained_rows: int
    skipped_rows: int
    supervised_tokens: int


class _ProgressBarOnly(ProgressCallback):
    """Keep the progress bar, drop the per-step loss lines: the losses go to MLflow instead."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        pass


def checkpoint_folder(params: FinetuneParams, base_model: str, data: DatasetRef, checkpoints: Path) -> Path:
    """Where this training's checkpoints live: the same for every attempt with the same inputs, so the next
    attempt (a Prefect retry, or the next run) finds what a crashed one left."""
    key = hashlib.sha256(f"{params.model_dump_json()}|{base_model}|{data.train_md5}".encode()).hexdigest()[:16]
    return checkpoints / key


def newest_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was written to the end. The Trainer writes trainer_state.json last, so a
    checkpoint counts only if that file parses and its adapter weights load; others are skipped, never loaded."""
    for checkpoint in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            load_file(checkpoint / "adapter_model.safetensors")
            if not (checkpoint / "optimizer.pt").stat().st_size:
                raise OSError("empty optimizer state")
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("skipping incomplete checkpoint %s (%s)", checkpoint, exc)
            continue
        return checkpoint
    return None


def finetune(params: FinetuneParams, base_model: str, data: DatasetRef, out: Path, checkpoints: Path) -> FinetuneResult:
    """Train a LoRA adapter on `data.train` and write it, with its config and metadata, to `out`.

    Rows whose response is cut away entirely by `max_seq_len` teach nothing (and would make the loss NaN
    in a batch of only such rows), so they are skipped and counted. Checkpoints go to a folder under
    `checkpoints` keyed by the inputs; training resumes from the newest complete one and removes them once
    the adapter is saved.
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
    set_seed(params.seed)  # the adapter's random init must not depend on what ran before in this process
    model = get_peft_model(model, lora)

    checkpoint_dir = checkpoint_folder(params, base_model, data, checkpoints)
    with atomic_dir(out) as tmp:
        steps_per_epoch = -(-len(usable) // params.batch_size)
        total_steps = max(1, round(steps_per_epoch * params.epochs))
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(checkpoint_dir),
                per_device_train_batch_size=params.batch_size,
                max_steps=total_steps,
                learning_rate=params.learning_rate,
                lr_scheduler_type="linear",
                warmup_steps=int(total_steps * params.warmup_ratio),
                logging_steps=1,
                save_strategy="steps",
                save_steps=params.checkpoint_steps,
                save_total_limit=2,
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
        resume_from = newest_complete_checkpoint(checkpoint_dir)
        if resume_from:
            log.info("resuming from %s", resume_from)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        model.save_pretrained(tmp / "adapter")
        result = FinetuneResult(
            adapter_dir=out / "adapter",
            steps=trainer.state.global_step,
            resumed_from_step=int(resume_from.name.split("-")[-1]) if resume_from else 0,
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
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the adapter is safe in `out`; nothing left to resume
    return result


finetune_task = cached_stage(finetune)


def main() -> None:
    """DVC stage `finetune`."""
    params, out = dvc_stage_args("finetune")
    data = load_result(DatasetRef, out.with_name("validate"))
    result = finetune(params.finetune, params.model.base, data, out, params.work_dir / "checkpoints")
    save_result(result, out)


if __name__ == "__main__":
    main()
