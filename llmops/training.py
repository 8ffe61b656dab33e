"""One training process: LoRA (or QLoRA) with the Hugging Face Trainer, alone or as one DeepSpeed rank.

`tasks/finetune.py` runs this module in a child process (`python -m llmops.training JOB.json`): directly
for one process, or through the DeepSpeed launcher for N ranks on one or several hosts, so both run exactly
this code. The child imports nothing of the orchestrator, and whatever kills it (OOM, kill -9, a crashed
kernel) leaves the flow standing to report it and retry from the newest checkpoint.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from llmops.config import DistributedParams, FinetuneParams
from llmops.data import read_examples
from llmops.errors import LLMOpsError
from llmops.modeling import IGNORE_INDEX, collate, encode_example, load_model, load_tokenizer

log = logging.getLogger("llmops.training")


class TrainingJob(BaseModel, frozen=True):
    """What a training process needs, written as JSON by the parent: every rank reads the same file."""

    params: FinetuneParams
    base_model: str
    train_file: Path
    adapter_dir: Path
    checkpoint_dir: Path
    result_file: Path  # rank 0 writes a TrainingOutcome here on success
    error_file: Path  # any rank writes a user-facing error message here on bad input


class TrainingOutcome(BaseModel, frozen=True):
    steps: int
    resumed_from_step: int  # 0 for a fresh start
    final_loss: float
    loss_history: list[float]
    trained_rows: int
    skipped_rows: int
    supervised_tokens: int
    world_size: int
    sequences: int  # training sequences per epoch: rows, or packs of rows with packing on
    tokens: int  # non-padding tokens through the model, all ranks
    tokens_per_second: float  # of those, per second of training (start-up and saving excluded)
    peak_memory_mb: float  # rank 0, while training: GPU memory allocated, or the process's resident memory


def pack_examples(rows: list[dict], max_len: int) -> list[dict]:
    """Pack encoded rows into sequences of at most `max_len` tokens (best fit, longest rows first).

    Positions restart at 0 for every row and `collate_packed` masks attention to each row, so every row is
    scored exactly as if it were alone. Each row starts with a masked label (its BOS or prompt), so no row is
    trained to predict the next row's start.
    """
    packs: list[list[dict]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, pack index), sorted
    for row in sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True):
        length = len(row["input_ids"])
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, index = free.pop(slot)
        else:
            space, index = max_len, len(packs)
            packs.append([])
        packs[index].append(row)
        if space - length > 0:
            bisect.insort(free, (space - length, index))
    return [
        {
            "input_ids": [t for row in pack for t in row["input_ids"]],
            "labels": [t for row in pack for t in [IGNORE_INDEX, *row["labels"][1:]]],
            "position_ids": [p for row in pack for p in range(len(row["input_ids"]))],
        }
        for pack in packs
    ]


def collate_packed(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed sequences, with a block-diagonal causal mask: each token attends only to the tokens
    before it in its own row, and positions restart at 0 for every row.

    The mask is given whole (batch, 1, length, length) rather than derived by transformers from the
    restarting positions: deriving it costs more than the attention itself on a CPU, and is skipped
    altogether whenever the model keeps a KV cache.
    """
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)
    segment = torch.full((len(batch), width), -1, dtype=torch.long)  # which row of the pack; -1: padding
    for row, item in enumerate(batch):
        length = len(item["input_ids"])
        input_ids[row, :length] = torch.tensor(item["input_ids"])
        labels[row, :length] = torch.tensor(item["labels"])
        position_ids[row, :length] = torch.tensor(item["position_ids"])
        segment[row, :length] = (position_ids[row, :length] == 0).cumsum(0)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same_row = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    # Padding attends to itself only, so no attention row is empty (an empty row would give NaN).
    mask = (same_row & causal) | torch.eye(width, dtype=torch.bool)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask[:, None]}


class _Batcher:
    """The data collator, counting the real (non-padding) tokens it hands to the model."""

    def __init__(self, pad_token_id: int, packed: bool) -> None:
        self.pad_token_id, self.packed, self.tokens = pad_token_id, packed, 0

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        self.tokens += sum(len(item["input_ids"]) for item in batch)
        return (collate_packed if self.packed else collate)(batch, self.pad_token_id)


class _LogProgress(TrainerCallback):
    """One log line about every 5% of training: the parent streams it to the flow's logs (and `llmops run`
    draws its progress bar from it: steps, loss, and rank 0's tokens so far for the rate)."""

    def __init__(self, batcher: _Batcher) -> None:
        self.batcher = batcher

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        every = max(1, state.max_steps // 20)
        on_schedule = state.global_step % every == 0 or state.global_step == state.max_steps
        if state.is_world_process_zero and logs and "loss" in logs and on_schedule:
            step, steps, loss, tokens = state.global_step, state.max_steps, logs["loss"], self.batcher.tokens
            log.info("step %d/%d  loss %.4f  tokens %d", step, steps, loss, tokens)


def newest_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was written to the end. The Trainer writes trainer_state.json last, after
    the weights and the optimizer state (one file, or one shard per DeepSpeed rank), so a checkpoint counts
    only if that file parses, its adapter weights load and no file in it is empty; others are skipped with a
    warning, never loaded."""
    for checkpoint in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            load_file(checkpoint / "adapter_model.safetensors")
            if not (checkpoint / "optimizer.pt").exists() and not list(checkpoint.glob("global_step*")):
                raise OSError("no optimizer state")
            empty = [f.name for f in checkpoint.rglob("*") if f.is_file() and not f.stat().st_size]
            if empty:
                raise OSError(f"empty file {empty[0]}")
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("skipping incomplete checkpoint %s (%s)", checkpoint, exc)
            continue
        return checkpoint
    return None


def deepspeed_config(distributed: DistributedParams) -> dict:
    """The ZeRO config; batch sizes, clipping and precision stay "auto" so the Trainer's values rule."""
    zero: dict = {"stage": distributed.zero_stage}
    if distributed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if distributed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if distributed.zero_stage == 3:
        # Without this, ZeRO-3 saves each rank's empty weight shards and the adapter comes out empty.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


def train(job: TrainingJob) -> TrainingOutcome:
    """Train the adapter, checkpointing every `checkpoint_steps` and resuming from the newest complete
    checkpoint in `job.checkpoint_dir`; all ranks take part in saving, rank 0 writes the files."""
    params = job.params
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available()
    bf16 = params.precision == "bf16" or (params.precision == "auto" and on_gpu and torch.cuda.is_bf16_supported())

    tokenizer = load_tokenizer(job.base_model)
    encoded = [encode_example(tokenizer, e, params.max_seq_len) for e in read_examples(job.train_file)]
    usable = [row for row in encoded if any(label != IGNORE_INDEX for label in row["labels"])]
    if not usable:
        raise LLMOpsError(
            f"No row of {job.train_file} keeps a response token within finetune.max_seq_len="
            f"{params.max_seq_len}: raise it or shorten the prompts."
        )
    if len(usable) < len(encoded):
        log.warning("skipping %d rows whose response is truncated away", len(encoded) - len(usable))
    sequences = pack_examples(usable, params.max_seq_len) if params.packing else usable

    micro_batch = params.micro_batch_size or params.batch_size // world_size
    if params.batch_size % (micro_batch * world_size):
        raise LLMOpsError(
            f"finetune.batch_size={params.batch_size} is not a multiple of micro_batch_size x ranks "
            f"({micro_batch} x {world_size}): change batch_size, micro_batch_size or distributed.processes."
        )
    total_steps = max(1, round(-(-len(sequences) // params.batch_size) * params.epochs))
    if world_size > 1:
        import deepspeed  # ranks only: one process trains without it

        # Before the model loads: ZeRO-3 shards weights as they load, which needs every rank connected.
        deepspeed.init_distributed(timeout=timedelta(minutes=params.distributed.timeout_minutes))
    # Made before the model: under ZeRO-3 this lets from_pretrained load each rank's shard only.
    args = TrainingArguments(
        output_dir=str(job.checkpoint_dir),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=params.batch_size // (micro_batch * world_size),
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
        use_cpu=not on_gpu,
        bf16=bf16,
        activation_checkpointing=params.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=deepspeed_config(params.distributed) if world_size > 1 else None,
        ddp_timeout=int(params.distributed.timeout_minutes * 60),
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if on_gpu and params.quantization == "nf4" else None
    model = load_model(job.base_model, params.quantization, torch.bfloat16 if bf16 else torch.float32, device)
    if params.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    lora = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=list(params.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    set_seed(params.seed)  # the adapter's random init must not depend on what ran before in this process
    model = get_peft_model(model, lora)

    batcher = _Batcher(tokenizer.pad_token_id, params.packing)
    trainer = Trainer(model=model, args=args, train_dataset=sequences, data_collator=batcher)
    trainer.remove_callback(PrinterCallback)  # it prints every step's dict; _LogProgress says enough
    trainer.add_callback(_LogProgress(batcher))
    resume_from = newest_complete_checkpoint(job.checkpoint_dir)
    if resume_from:
        log.info("resuming from %s", resume_from)
    _reset_peak_memory(on_gpu)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    trainer.save_model(str(job.adapter_dir))  # collective: under ZeRO-3 it gathers the sharded adapter first

    tokens = torch.tensor(float(batcher.tokens), device=args.device)  # NCCL reduces GPU tensors only
    if world_size > 1:
        torch.distributed.all_reduce(tokens)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return TrainingOutcome(
        steps=trainer.state.global_step,
        resumed_from_step=int(resume_from.name.split("-")[-1]) if resume_from else 0,
        final_loss=losses[-1],
        loss_history=losses,
        trained_rows=len(usable),
        skipped_rows=len(encoded) - len(usable),
        supervised_tokens=sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in usable),
        world_size=world_size,
        sequences=len(sequences),
        tokens=int(tokens.item()),
        tokens_per_second=tokens.item() / seconds,
        peak_memory_mb=_peak_memory_mb(on_gpu),
    )


def _reset_peak_memory(on_gpu: bool) -> None:
    """Start counting peak memory at training, after loading: the figure is what training needs."""
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the resident-set high-water mark


def _peak_memory_mb(on_gpu: bool) -> float:
    if on_gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def main() -> None:
    """Entry point of every training process: `python -m llmops.training JOB.json`."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()  # a bar redrawn through a pipe arrives as one log line per redraw
    job = TrainingJob.model_validate_json(Path(sys.argv[1]).read_text())
    try:
        outcome = train(job)
    except LLMOpsError as exc:
        job.error_file.write_text(str(exc))
        sys.exit(2)
    if rank == 0:
        job.result_file.write_text(outcome.model_dump_json())


if __name__ == "__main__":
    main()
