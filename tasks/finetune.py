"""LoRA (or QLoRA on an NF4 base) fine-tuning with the loss on response tokens only, in one process or as
N DeepSpeed ranks across GPUs and hosts.

The training itself runs in child processes (`llmops/training.py`): one, or N launched by the DeepSpeed
launcher. This stage launches them, streams their logs, stops every rank if one fails or training stalls,
and checks the adapter they saved before anything downstream trusts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO

from safetensors.torch import load_file

from llmops.config import DistributedParams, FinetuneParams, ModelParams, dvc_stage_args
from llmops.data import DatasetRef
from llmops.devices import DeviceChoice, DtypeChoice, resolve_placement
from llmops.errors import LLMOpsError
from llmops.files import atomic_dir, exclusive, load_result, save_result, write_json, write_stage_metadata
from llmops.training import (
    TargetModules,
    TrainingErrorReport,
    TrainingJob,
    TrainingOutcome,
    linear_layers,
    resolve_target_modules,
    training_slot,
)

log = logging.getLogger(__name__)


class FinetuneResult(TrainingOutcome, frozen=True):
    adapter_dir: Path
    target_modules: TargetModules  # which linear layers were adapted, and which were left out


class TrainingFailed(LLMOpsError):
    """A training process was killed (by a signal: out of memory, preemption) or stalled; every rank has been
    stopped, and a retry resumes from the newest checkpoint (exit code 1)."""

    exit_code = 1


class TrainingRaised(LLMOpsError):
    """A training process raised an exception that is not bad input (exit code 1). Not retried: the same
    inputs would crash the same way."""

    exit_code = 1


def checkpoint_folder(params: FinetuneParams, base_model: str, data: DatasetRef, checkpoints: Path) -> Path:
    """Where this training's checkpoints live: the same for every attempt with the same inputs, so the next
    attempt (a Prefect retry, or the next run) finds what a crashed one left. The params include the rank
    count, whose DeepSpeed checkpoints only that count can resume."""
    key = hashlib.sha256(
        f"{params.model_dump_json()}|{base_model}|{data.train_md5}|{data.chat_template}".encode()
    ).hexdigest()[:16]
    return checkpoints / key


def checkpoint_lock(checkpoint_dir: Path) -> Path:
    """The lock a training holds on its checkpoint folder, kept beside the checkpoints folder, not in it."""
    return checkpoint_dir.parent.with_name(f"{checkpoint_dir.parent.name}.locks") / f"{checkpoint_dir.name}.lock"


def finetune(
    params: FinetuneParams,
    base_model: str | ModelParams,
    data: DatasetRef,
    out: Path,
    checkpoints: Path,
    device: DeviceChoice = "auto",
    dtype: DtypeChoice = "auto",
) -> FinetuneResult:
    """Train a LoRA adapter on `data.train` and write it, with its config and metadata, to `out`.

    `base_model` is a model folder or hub id, or the `model` params (with a revision and trust_remote_code).

    Rows whose response is cut away entirely by `max_seq_len` teach nothing (and would make the loss NaN
    in a batch of only such rows), so they are skipped and counted. Checkpoints go to a folder under
    `checkpoints` keyed by the inputs; training resumes from the newest complete one and removes them once
    the adapter is saved. `device` and `dtype` are the device policy (model.device, model.dtype).

    Raises:
        TrainingFailed: a training process was killed or stalled (retried by the flow).
        TrainingRaised: a training process raised an unexpected exception (not retried).
        LLMOpsError: the inputs cannot be trained on (target modules the model lacks, no usable row, a batch
            size the ranks cannot split).
    """
    placement = resolve_placement(device, dtype)  # a bad policy fails here, before any process starts
    log.info("training on %s", placement)
    model = base_model if isinstance(base_model, ModelParams) else ModelParams(base=base_model)
    base_model = model.base
    # Checked here, from the config alone, so a wrong name costs a second and not a failed training.
    targets = resolve_target_modules(params.lora, linear_layers(base_model, model.revision, model.trust_remote_code))
    log.info("LoRA adapts %d layers: %s", targets.adapted_layers, ", ".join(targets.adapted))
    if targets.not_adapted:
        log.warning(
            "finetune.lora.target_modules leaves these linear layers without an adapter: %s",
            ", ".join(targets.not_adapted),
        )
    pinned = base_model + (f"@{model.revision}" if model.revision else "")
    checkpoint_dir = checkpoint_folder(params, pinned, data, checkpoints)
    # One training owns its checkpoint folder: a second run with the same inputs waits for it (then resumes
    # from what it left, if it crashed) instead of both writing, and one deleting, the same checkpoints.
    with exclusive(checkpoint_lock(checkpoint_dir), "waiting for a run training the same"):
        with atomic_dir(out) as tmp:
            job = TrainingJob(
                params=params,
                base_model=base_model,
                revision=model.revision,
                trust_remote_code=model.trust_remote_code,
                train_file=data.train,
                adapter_dir=tmp / "adapter",
                checkpoint_dir=checkpoint_dir,
                result_file=tmp / "training.json",
                error_file=tmp / "training-error.json",
                traceback_file=checkpoint_dir / "training-traceback.txt",
                chat_template=data.chat_template,
                device=device,
                dtype=dtype,
            )
            outcome = run_training(job)
            check_adapter(job.adapter_dir, params)
            result = FinetuneResult(adapter_dir=out / "adapter", target_modules=targets, **outcome.model_dump())
            write_stage_metadata(
                tmp,
                "finetune",
                params,
                base_model=base_model,
                revision=model.revision,
                dataset=data.model_dump(mode="json"),
                **result.model_dump(mode="json", exclude={"loss_history"}),
            )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the adapter is safe in `out`; nothing left to resume
    return result


def training_command(job_file: Path, distributed: DistributedParams) -> list[str]:
    """One plain process, or the DeepSpeed launcher starting `processes` ranks here or on every host."""
    worker = ["-m", "llmops.training", str(job_file)]
    if not distributed.uses_deepspeed:
        return [sys.executable, "-u", *worker]
    if distributed.hostfile is not None and not distributed.hostfile.is_file():
        raise LLMOpsError(
            f"finetune.distributed.hostfile {distributed.hostfile} does not exist. Write one line per host "
            "(`worker-1 slots=8`), or unset it to train on this host only."
        )
    return [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.runner",
        # /dev/null is no hostfile: DeepSpeed would otherwise pick up /job/hostfile if one happened to exist.
        f"--hostfile={distributed.hostfile or '/dev/null'}",
        f"--num_gpus={distributed.processes}",
        f"--master_port={_free_port()}",
        "--no_local_rank",  # ranks read LOCAL_RANK from the environment
        "--module",
        *worker[1:],
    ]


def run_training(job: TrainingJob) -> TrainingOutcome:
    """Run the training processes to the end, streaming their output into this stage's log.

    They run in a process group of their own: if any rank fails the DeepSpeed launcher stops the others,
    and whatever happens here (a stall past the timeout, an interrupt, a cancelled flow) the whole group is
    stopped before this returns, so no rank outlives the stage.
    """
    distributed = job.params.distributed
    job_file = job.result_file.with_name("training-job.json")
    write_json(job_file, job.model_dump(mode="json"))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # Library deprecation notices, once per rank and step, would bury the progress lines.
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    on_cpu = not resolve_placement(job.device, job.dtype).on_gpu
    if on_cpu:
        env["DS_ACCELERATOR"] = "cpu"  # ranks talk over gloo
    # This host's trainings take turns (or, with more slots, each gets its share of the cores): the slot is
    # held from before the processes start until they are all gone, and only then.
    with training_slot(job.params.host_slots, distributed.processes) as share:
        if on_cpu:
            threads = int((os.cpu_count() or 1) * share) // distributed.processes
            env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
        process = subprocess.Popen(
            training_command(job_file, distributed),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            env=env,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        tail: deque[str] = deque(maxlen=12)
        try:
            while (line := lines.get(timeout=distributed.timeout_minutes * 60)) is not None:
                tail.append(line)
                log.info("%s", line)
            code = process.wait()
        except queue.Empty:
            raise TrainingFailed(
                f"Training printed nothing for {distributed.timeout_minutes:g} minutes, so a rank is hung or "
                "deadlocked; every training process was stopped. Last lines:\n" + "\n".join(tail)
            ) from None
        finally:
            _stop_group(process)
            job_file.unlink()
    if job.error_file.exists():  # the training raised: its own message, no out-of-memory guesswork
        error = TrainingErrorReport.model_validate_json(job.error_file.read_text())
        if error.user_error:
            raise LLMOpsError(error.message)
        raise TrainingRaised(
            f"Training crashed: {error.message}. Every training process was stopped; it is not retried, since "
            f"the same inputs would crash again. The traceback is in {job.traceback_file}."
        )
    if code != 0 or not job.result_file.exists():
        # No exception was reported, so a process died without a word: killed by a signal (the out-of-memory
        # killer, a preemption), or under DeepSpeed a rank so killed, which the launcher reports as a code.
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        raise TrainingFailed(
            f"Training {how} without reporting an error; every training process was stopped. A process killed "
            "by a signal (SIGKILL) is often the out-of-memory killer, or a preemption. The next attempt with the "
            "same data and params resumes from the newest complete checkpoint. Last lines:\n" + "\n".join(tail)
        )
    return TrainingOutcome.model_validate_json(job.result_file.read_text())


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip())
    lines.put(None)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the training process group, then SIGKILL whatever is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return  # the group is gone: every rank has exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_adapter(adapter_dir: Path, params: FinetuneParams) -> None:
    """Refuse an adapter whose tensors are empty or misshapen: what ZeRO-3 leaves when it saves shards
    instead of gathered weights."""
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    if not weights:
        raise TrainingFailed(f"The saved adapter in {adapter_dir} holds no tensors.")
    for name, tensor in weights.items():
        rank_dim = 0 if "lora_A" in name else 1
        if tensor.dim() != 2 or tensor.numel() == 0 or tensor.shape[rank_dim] != params.lora.r:
            raise TrainingFailed(
                f"The saved adapter tensor {name} has shape {tuple(tensor.shape)}, not a rank-{params.lora.r} LoRA "
                "matrix: ZeRO-3 saved a shard instead of the gathered weights. Nothing was published."
            )


def training_crashed(task, task_run, state) -> bool:
    """Retry a training that died (killed, out of memory, stalled), never bad input: the retry resumes from
    the newest checkpoint the crashed attempt left."""
    try:
        state.result()
    except TrainingFailed:
        return True
    except Exception:  # noqa: BLE001 - any other failure is not worth a retry
        return False
    return False


def main() -> None:
    """DVC stage `finetune`."""
    params, out = dvc_stage_args("finetune")
    data = load_result(DatasetRef, out.with_name("validate"))
    model, checkpoints = params.model, params.work_dir / "checkpoints"
    result = finetune(params.finetune, model, data, out, checkpoints, model.device, model.dtype)
    save_result(result, out)


if __name__ == "__main__":
    main()
