import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from llmops.config import DistributedParams, FinetuneParams, MergeParams
from llmops.data import read_conversations
from llmops.errors import LLMOpsError
from llmops.modeling import collate, encode_conversation, load_model, load_tokenizer
from llmops.training import collate_packed, newest_complete_checkpoint, pack_examples
from tasks.finetune import TrainingFailed, checkpoint_folder, checkpoint_lock, finetune
from tasks.merge import merge_adapter
from tests.conftest import training_processes


def test_lora_training_lowers_the_loss_and_saves_a_loadable_adapter(assets, demo_data, one_epoch_adapter):
    result, params = one_epoch_adapter, FinetuneParams(epochs=1)
    assert result.steps == -(-demo_data.train_rows // params.batch_size) and result.world_size == 1
    first, last = sum(result.loss_history[:5]) / 5, sum(result.loss_history[-5:]) / 5
    assert last < first * 0.6, (first, last)
    assert result.tokens_per_second > 0 and result.peak_memory_mb > 0
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)  # B starts at zero
    model = PeftModel.from_pretrained(load_model(assets / "model"), result.adapter_dir)
    assert model.peft_config["default"].r == params.lora.r
    # The folder says what made it, and holds nothing of the training processes' bookkeeping.
    folder = result.adapter_dir.parent
    assert json.loads((folder / "llmops_config.json").read_text())["learning_rate"] == params.learning_rate
    meta = json.loads((folder / "llmops_metadata.json").read_text())
    assert meta["dataset"]["train_md5"] == demo_data.train_md5 and meta["steps"] == result.steps
    assert not (folder / "training-job.json").exists()
    assert not list(folder.parent.glob("*.partial-*"))
    assert result.resumed_from_step == 0 and not list((folder.parent / "ckpt").glob("*"))  # cleaned up


def test_qlora_trains_on_a_4bit_base(assets, demo_data, tmp_path):
    params = FinetuneParams(quantization="nf4", epochs=0.2)
    result = finetune(params, str(assets / "model"), demo_data, tmp_path / "q", tmp_path / "ckpt")
    assert result.steps > 0 and all(loss == loss for loss in result.loss_history)  # no NaN
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(result.target_modules.adapted)  # all-linear on the 4-bit base
    llama = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(result.target_modules.adapted) == llama


def test_bad_input_found_by_the_training_process_is_a_clear_error(assets, demo_data, tmp_path):
    # Raised inside the child process; it must come back as the same one-paragraph error, not a crash.
    with pytest.raises(LLMOpsError, match="max_seq_len=8") as caught:
        finetune(FinetuneParams(max_seq_len=8), str(assets / "model"), demo_data, tmp_path / "ft", tmp_path / "ckpt")
    assert not isinstance(caught.value, TrainingFailed)
    assert not (tmp_path / "ft").exists() and not list(tmp_path.glob("ft.partial-*"))


def run_in_background(*args) -> tuple[threading.Thread, dict]:
    """Run `finetune(*args)` in a thread; the dict receives its `result` or its `error`."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = finetune(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the test to assert on
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def wait_for(path: Path, thread: threading.Thread, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert thread.is_alive() and time.monotonic() < deadline, f"training ended before writing {path}"
        time.sleep(0.2)


RESUME_PARAMS = FinetuneParams(epochs=2, checkpoint_steps=10)


def test_killed_training_process_fails_the_stage_and_the_next_attempt_resumes(assets, demo_data, tmp_path):
    base = str(assets / "model")
    folder = checkpoint_folder(RESUME_PARAMS, base, demo_data, tmp_path / "ckpt")
    thread, outcome = run_in_background(RESUME_PARAMS, base, demo_data, tmp_path / "ft", tmp_path / "ckpt")
    wait_for(folder / "checkpoint-20" / "trainer_state.json", thread)
    for process in training_processes():
        process.send_signal(signal.SIGKILL)  # what the out-of-memory killer or a preemption does
    thread.join()
    assert isinstance(outcome.get("error"), TrainingFailed), outcome
    assert "SIGKILL" in str(outcome["error"]) and "resumes" in str(outcome["error"])
    assert not (tmp_path / "ft").exists()  # a killed stage leaves no output a later stage could trust

    resumed = finetune(RESUME_PARAMS, base, demo_data, tmp_path / "ft", tmp_path / "ckpt")
    assert resumed.resumed_from_step >= 20
    uninterrupted = finetune(RESUME_PARAMS, base, demo_data, tmp_path / "straight", tmp_path / "other-ckpt")
    assert resumed.steps == uninterrupted.steps
    assert resumed.final_loss == pytest.approx(uninterrupted.final_loss, abs=0.05)


def test_incomplete_checkpoints_are_skipped_not_loaded(assets, demo_data, tmp_path):
    base = str(assets / "model")
    folder = checkpoint_folder(RESUME_PARAMS, base, demo_data, tmp_path / "ckpt")
    folder.mkdir(parents=True)
    # A checkpoint whose state file was cut mid-write, and one whose weights are truncated.
    (folder / "checkpoint-30").mkdir()
    (folder / "checkpoint-30" / "trainer_state.json").write_text('{"global_step": 4')
    (folder / "checkpoint-40").mkdir()
    (folder / "checkpoint-40" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-40" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00")
    assert newest_complete_checkpoint(folder) is None
    result = finetune(RESUME_PARAMS, base, demo_data, tmp_path / "ft", tmp_path / "ckpt")
    assert result.resumed_from_step == 0 and result.steps > 40


def test_packing_scores_every_row_exactly_as_if_it_were_alone(assets, demo_data):
    """Packed rows must not see each other: the packed loss equals the loss of the rows one by one."""
    tokenizer, model = load_tokenizer(assets / "model"), load_model(assets / "model")
    single_turn = [c for c in read_conversations(demo_data.train) if len(c.turns) == 3][:40]
    rows = [encode_conversation(tokenizer, c, 512) for c in single_turn]
    packs = pack_examples(rows, max_len=512)
    assert len(packs) <= len(rows) / 2.5 and all(len(p["input_ids"]) <= 512 for p in packs)
    assert sum(len(p["input_ids"]) for p in packs) == sum(len(r["input_ids"]) for r in rows)  # nothing lost

    def summed_loss(batch: dict) -> tuple[float, int]:
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        return loss.item(), int((targets != -100).sum())

    with torch.no_grad():
        packed_loss, packed_tokens = summed_loss(collate_packed(packs, tokenizer.pad_token_id))
        alone = [summed_loss(collate([row], tokenizer.pad_token_id)) for row in rows]
    assert packed_tokens == sum(tokens for _, tokens in alone)
    assert packed_loss == pytest.approx(sum(loss for loss, _ in alone), rel=1e-4)


def test_packing_and_gradient_checkpointing_train(assets, demo_data, tmp_path):
    params = FinetuneParams(epochs=4, max_seq_len=512, packing=True, gradient_checkpointing=True)  # ~20 steps
    result = finetune(params, str(assets / "model"), demo_data, tmp_path / "ft", tmp_path / "ckpt")
    assert result.sequences <= result.trained_rows / 2.5  # several rows per sequence
    assert result.loss_history[-1] < result.loss_history[0] * 0.5


@pytest.mark.slow
def test_two_zero2_ranks_train_like_one_process_survive_a_dead_rank_and_merge(
    assets, demo_data, one_epoch_adapter, tmp_path
):
    """2 CPU ranks over gloo: same global batch, so the same losses as one process; a rank killed mid-run
    stops every rank with a clear error, and the next attempt resumes from the DeepSpeed checkpoint."""
    base = str(assets / "model")
    params = FinetuneParams(epochs=1, checkpoint_steps=10, distributed=DistributedParams(processes=2, zero_stage=2))
    folder = checkpoint_folder(params, base, demo_data, tmp_path / "ckpt")
    thread, outcome = run_in_background(params, base, demo_data, tmp_path / "ft", tmp_path / "ckpt")
    wait_for(folder / "checkpoint-10" / "trainer_state.json", thread)
    ranks = training_processes()
    rank_1 = next(p for p in ranks if p.environ().get("RANK") == "1")
    rank_1.send_signal(signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive(), "a dead rank left the stage hanging"
    assert isinstance(outcome.get("error"), TrainingFailed), outcome
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)  # rank 0 stopped too

    result = finetune(params, base, demo_data, tmp_path / "ft", tmp_path / "ckpt")
    assert result.world_size == 2 and result.resumed_from_step >= 10 and result.steps == one_epoch_adapter.steps
    # Same data order and global batch as the single process: the losses agree until the resume point.
    assert result.loss_history[:8] == pytest.approx(one_epoch_adapter.loss_history[:8], rel=1e-3)
    assert result.loss_history[-1] < result.loss_history[0] * 0.5
    merged = merge_adapter(MergeParams(), base, result, demo_data, tmp_path / "merged")
    assert not merged.fidelity.problems(MergeParams())


def test_a_silent_training_is_stopped_after_the_timeout(assets, demo_data, tmp_path):
    # Python and torch take over a second to start before a training process prints its first line, so a
    # 0.6 s timeout always finds it silent: the stand-in for a rank hung in a collective.
    params = FinetuneParams(distributed=DistributedParams(timeout_minutes=0.01))
    with pytest.raises(TrainingFailed, match="printed nothing"):
        finetune(params, str(assets / "model"), demo_data, tmp_path / "ft", tmp_path / "ckpt")
    assert not training_processes() and not (tmp_path / "ft").exists()


def test_a_missing_hostfile_is_a_clear_error(assets, demo_data, tmp_path):
    params = FinetuneParams(distributed=DistributedParams(processes=2, hostfile=tmp_path / "hostfile"))
    with pytest.raises(LLMOpsError, match="hostfile"):
        finetune(params, str(assets / "model"), demo_data, tmp_path / "ft", tmp_path / "ckpt")


def test_a_second_training_with_the_same_inputs_waits_for_the_first(assets, tmp_path):
    """A training owns its checkpoint folder: another with the same key waits until it is released (here the
    waiting one then fails fast on a missing hostfile, so nothing trains)."""
    from llmops.data import DatasetRef
    from llmops.files import exclusive

    base = str(assets / "model")
    data = DatasetRef(train=tmp_path / "t", eval=tmp_path / "e", train_rows=1, eval_rows=1, train_md5="a", eval_md5="b")
    params = FinetuneParams(distributed=DistributedParams(processes=2, hostfile=tmp_path / "hostfile"))
    folder = checkpoint_folder(params, base, data, tmp_path / "ckpt")
    with exclusive(checkpoint_lock(folder), "held by the test"):
        thread, outcome = run_in_background(params, base, data, tmp_path / "ft", tmp_path / "ckpt")
        time.sleep(2)
        assert thread.is_alive() and not outcome  # waiting for the checkpoint folder, not training
    thread.join(timeout=30)
    assert isinstance(outcome.get("error"), LLMOpsError) and "hostfile" in str(outcome["error"])


def test_two_trainings_started_together_take_turns_on_a_cpu_host(assets, demo_data, tmp_path):
    """Two runs training on one CPU host: each took every core's threads and both crawled (420 tokens/s each
    instead of 11,400 on 2 cores). With one slot per CPU host, the second waits for the first: what the
    training processes recorded shows their trainings did not overlap, and each trained on all the cores."""
    base = str(assets / "model")
    runs = [
        run_in_background(
            FinetuneParams(epochs=0.5, seed=seed), base, demo_data, tmp_path / f"ft{seed}", tmp_path / f"c{seed}"
        )
        for seed in (0, 1)
    ]
    for thread, _ in runs:
        thread.join()
    first, second = sorted((outcome["result"] for _, outcome in runs), key=lambda r: r.started_at)
    assert first.finished_at <= second.started_at, (first, second)
    assert first.threads == second.threads == int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))


def test_a_training_given_a_share_of_the_host_uses_that_share_of_its_cores(assets, demo_data, tmp_path):
    params = FinetuneParams(epochs=0.2, host_slots=2)  # two trainings at once: half the cores each
    result = finetune(params, str(assets / "model"), demo_data, tmp_path / "ft", tmp_path / "ckpt")
    assert result.threads == int(os.environ.get("OMP_NUM_THREADS", max(1, os.cpu_count() // 2)))
