"""One training process: LoRA (or QLoRA) with the Hugging Face Trainer, alone or as one DeepSpeed rank.

`tasks/finetune.py` runs this module in a child process (`python -m llmops.training JOB.json`): directly
for one process, or through the DeepSpeed launcher for N ranks on one or several hosts, so both run exactly
this code. The child imports nothing of the orchestrator, and whatever kills it (OOM, kill -9, a crashed
kernel) leaves the flow standing to report it and retry from the newest checkpoint. The parent imports
this module for the job's types and the layer check only: `train` imports the Trainer and PEFT itself, so a
flow whose finetune comes from the cache never loads them.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from llmops.config import DistributedParams, FinetuneParams, LoraParams
from llmops.data import read_conversations
from llmops.devices import DeviceChoice, DtypeChoice, resolve_placement
from llmops.errors import LLMOpsError
from llmops.modeling import IGNORE_INDEX, collate, encode_conversation, load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import TrainerCallback

log = logging.getLogger("llmops.training")


class TrainingJob(BaseModel, frozen=True):
    """What a training process needs, written as JSON by the parent: every rank reads the same file."""

    params: FinetuneParams
    base_model: str
    revision: str | None = None
    trust_remote_code: bool = False
    train_file: Path
    adapter_dir: Path
    checkpoint_dir: Path
    result_file: Path  # rank 0 writes a TrainingOutcome here on success
    error_file: Path  # a rank whose training raised writes a TrainingErrorReport here
    traceback_file: Path | None = None  # and the traceback of a crash here, kept for whoever debugs it
    chat_template: str | None = None  # data.chat_template's text, replacing the tokenizer's own
    device: DeviceChoice = "auto"  # the device policy, model.device / model.dtype (llmops.devices)
    dtype: DtypeChoice = "auto"


class TrainingErrorReport(BaseModel, frozen=True):
    """An exception raised inside a training process, as the parent reports it."""

    user_error: bool  # bad input (LLMOpsError, ValueError): exit 2; anything else is a crash: exit 1
    message: str  # one paragraph


class TargetModules(BaseModel, frozen=True):
    """Which linear layers of the base get a LoRA adapter, resolved from its config before anything trains."""

    adapted: list[str]  # layer kinds (the last part of the module name: q_proj, c_attn, fc1, ...)
    not_adapted: list[str]  # linear layer kinds left out (the output head is never adapted)
    adapted_layers: int  # layers, over all blocks


def linear_layers(base_model: str, revision: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """Names of the model's linear (or GPT-2 Conv1D) layers, output head excluded: what `all-linear` adapts.

    The model is built from its config on the meta device: no weight is read and no memory is allocated,
    so this costs a second even for a 70B model."""
    try:
        config = AutoConfig.from_pretrained(base_model, revision=revision, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise LLMOpsError(
            f"Cannot build the model {base_model} from its config: {_one_paragraph(exc)}. Set model.base to a "
            "causal LM folder or Hugging Face model id (run `llmops bootstrap` for the default tiny model)."
        ) from None
    head = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head
    ]


def resolve_target_modules(lora: LoraParams, layers: list[str]) -> TargetModules:
    """Match `lora.target_modules` against the model's linear layers as PEFT does (a name matches a module
    whose name is that name or ends with `.name`).

    Raises:
        LLMOpsError: a listed name matches no linear layer; the message lists the model's layer kinds.
    """
    kinds = sorted({name.rsplit(".", 1)[-1] for name in layers})
    if lora.target_modules == "all-linear":
        return TargetModules(adapted=kinds, not_adapted=[], adapted_layers=len(layers))

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith(f".{target}")

    unmatched = [t for t in lora.target_modules if not any(matches(name, t) for name in layers)]
    if unmatched:
        raise LLMOpsError(
            f"finetune.lora.target_modules names {', '.join(unmatched)}, which match no linear layer of this model. "
            f"Its linear layers are: {', '.join(kinds)}. Set target_modules to `all-linear` (every one of them), "
            "or list some of these names."
        )
    chosen = [name for name in layers if any(matches(name, t) for t in lora.target_modules)]
    adapted = sorted({name.rsplit(".", 1)[-1] for name in chosen})
    return TargetModules(
        adapted=adapted, not_adapted=[k for k in kinds if k not in adapted], adapted_layers=len(chosen)
    )


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
    placement: str = ""  # where it trained, as the device policy resolved it ("cuda bfloat16", "cpu float32")
    # When training ran (Unix time, rank 0) and on how many CPU threads: what says whether trainings on one
    # host took turns or shared the cores (`training_slot`).
    started_at: float = 0.0
    finished_at: float = 0.0
    threads: int = 0


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


def _log_progress(batcher: _Batcher) -> TrainerCallback:
    """One log line about every 5% of training: the parent streams it to the flow's logs (and `llmops run`
    draws its progress bar from it: steps, loss, and rank 0's tokens so far for the rate)."""
    from transformers import TrainerCallback

    class LogProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
            every = max(1, state.max_steps // 20)
            on_schedule = state.global_step % every == 0 or state.global_step == state.max_steps
            if state.is_world_process_zero and logs and "loss" in logs and on_schedule:
                step, steps, loss, tokens = state.global_step, state.max_steps, logs["loss"], batcher.tokens
                log.info("step %d/%d  loss %.4f  tokens %d", step, steps, loss, tokens)

    return LogProgress()


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
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


def train(job: TrainingJob) -> TrainingOutcome:
    """Train the adapter, checkpointing every `checkpoint_steps` and resuming from the newest complete
    checkpoint in `job.checkpoint_dir`; all ranks take part in saving, rank 0 writes the files."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    params = job.params
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    placement = resolve_placement(job.device, job.dtype)
    on_gpu = placement.on_gpu
    # finetune.precision, when set, overrides the policy's type for training only.
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(params.precision, placement.dtype)

    tokenizer = load_tokenizer(job.base_model, job.chat_template, job.revision, job.trust_remote_code)
    encoded = [encode_conversation(tokenizer, c, params.max_seq_len) for c in read_conversations(job.train_file)]
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
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        activation_checkpointing=params.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=deepspeed_config(params.distributed) if world_size > 1 else None,
        ddp_timeout=int(params.distributed.timeout_minutes * 60),
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if on_gpu and params.quantization == "nf4" else None
    model = load_model(job.base_model, params.quantization, dtype, device, job.revision, job.trust_remote_code)
    if params.quantization == "nf4" and dtype != torch.bfloat16:
        # Upcasts every weight left unquantized (embeddings, norms) to float32, for float16's narrow range. In
        # bfloat16 that buys nothing and costs double: on a 0.5B model with a 152k vocabulary the embedding
        # alone would outweigh the 4-bit layers. (get_peft_model freezes the base either way.)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    lora = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    set_seed(params.seed)  # the adapter's random init must not depend on what ran before in this process
    model = get_peft_model(model, lora)

    batcher = _Batcher(tokenizer.pad_token_id, params.packing)
    trainer = Trainer(model=model, args=args, train_dataset=sequences, data_collator=batcher)
    trainer.remove_callback(PrinterCallback)  # it prints every step's dict; _log_progress says enough
    trainer.add_callback(_log_progress(batcher))
    resume_from = newest_complete_checkpoint(job.checkpoint_dir)
    if resume_from:
        log.info("resuming from %s", resume_from)
    _reset_peak_memory(on_gpu)
    started, started_at = time.perf_counter(), time.time()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds, finished_at = time.perf_counter() - started, time.time()
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
        placement=f"{placement.device} {str(dtype).removeprefix('torch.')}",
        started_at=started_at,
        finished_at=finished_at,
        threads=torch.get_num_threads(),
    )


# Where this host's training slots are: one lock file per slot, seen by every process on the host, whichever
# checkout or store it works for.
SLOT_DIR = Path(tempfile.gettempdir()) / "llmops-locks"


def host_slots(configured: int | None) -> int:
    """How many trainings this host runs at once: `finetune.host_slots`, else one per GPU, else one.

    One at a time on a CPU host: a training already uses every core, and two sharing them run far slower
    than one after the other (each CPU thread pool spins waiting for threads the other holds: on 2 cores the
    demo trained at 420 tokens/s each instead of 11,400)."""
    if configured:
        return configured
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


@contextmanager
def training_slot(configured: int | None, needed: int, lock_dir: Path = SLOT_DIR) -> Iterator[float]:
    """Hold `needed` of this host's training slots (at most all of them) while the block runs, waiting for
    them if other trainings hold them; yields the share of the host they are (needed / slots), which sizes a
    CPU training's threads. The retrain flow also takes one around merge and quantize, and one around
    evaluate: they run the model on the same cores (or GPU), and two runs sharing those thrash as trainings do.

    The slots are lock files (flock, released by the kernel however the holder dies) and, when a Prefect API
    is configured, also a Prefect global concurrency limit per host (`llmops-training-<host>`, created with
    as many slots on first use; change it in the UI to share differently), which covers every worker of that
    API. The Prefect limit is taken first and the files second, by every holder, so two can never each hold
    what the other waits for. A slot holder never waits for the registry's lock (evaluate takes its slot
    inside that lock, nothing takes the lock inside a slot), so the two cannot deadlock.

    A holder killed outright (a host lost mid-training) frees its Prefect slots within a minute, when its lease
    lapses, so a retry on another worker is not held up for long; a renewal that fails for a moment (the API
    restarting) leaves the training running, since losing the slot costs speed, never correctness."""
    from llmops.registry import prefect_api_configured, prefect_limit

    total = host_slots(configured)
    needed = max(1, min(needed, total))
    with ExitStack() as stack:
        if prefect_api_configured():
            name = f"llmops-training-{socket.gethostname()}"
            waiting = f"waiting for {needed} of this host's {total} training slots"
            stack.enter_context(prefect_limit(name, waiting, total, needed, lease_seconds=60, strict=False))
        stack.enter_context(_file_slots(lock_dir, total, needed))
        yield needed / total


@contextmanager
def _file_slots(lock_dir: Path, total: int, needed: int) -> Iterator[None]:
    """`needed` of `total` slot files, all or none: a partial set is given back before waiting, so two
    trainings can never each hold part of what the other needs."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    held: list[int] = []
    waiting = False
    try:
        while True:
            for index in range(total):
                if len(held) < needed and (fd := _try_lock(lock_dir / f"training-slot-{index}.lock")) is not None:
                    held.append(fd)
            if len(held) == needed:
                break
            for fd in held:
                os.close(fd)  # closing the file releases its lock
            held = []
            if not waiting:
                log.info("waiting for %d of this host's %d training slots (%s)", needed, total, lock_dir)
                waiting = True
            time.sleep(0.5)
        yield
    finally:
        for fd in held:
            os.close(fd)


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # created by another user: a lock needs only a file open for reading
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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


def _one_paragraph(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def _lost_a_peer(exc: Exception) -> bool:
    """A collective failed because another rank is gone (gloo or NCCL lost the connection): that death, not
    this rank's code, is what went wrong."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    return isinstance(exc, torch.distributed.DistError) or any(w in str(exc) for w in ("gloo", "NCCL", "Connection"))


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
    except (LLMOpsError, ValueError) as exc:  # bad input, said in its own words: no traceback
        job.error_file.write_text(TrainingErrorReport(user_error=True, message=_one_paragraph(exc)).model_dump_json())
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - a crash: reported to the parent, traceback kept in a file
        if _lost_a_peer(exc):
            raise  # another rank died (killed, out of memory): no report, so the parent retries and resumes
        if job.traceback_file is not None:
            job.traceback_file.parent.mkdir(parents=True, exist_ok=True)
            job.traceback_file.write_text(traceback.format_exc())
        message = f"{type(exc).__name__}: {_one_paragraph(exc)}"
        job.error_file.write_text(TrainingErrorReport(user_error=False, message=message).model_dump_json())
        sys.exit(1)
    if rank == 0:
        job.result_file.write_text(outcome.model_dump_json())


if __name__ == "__main__":
    main()
