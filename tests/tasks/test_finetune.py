import json
import signal
import subprocess
import sys
import time

import pytest
from peft import PeftModel
from safetensors.torch import load_file

from llmops.config import FinetuneParams, ValidateParams
from llmops.errors import LLMOpsError
from llmops.modeling import load_model
from tasks.finetune import checkpoint_folder, finetune, newest_complete_checkpoint
from tasks.validate import validate_dataset


@pytest.fixture(scope="module")
def data(assets):
    return validate_dataset(
        ValidateParams(), str(assets / "model"), 64, assets / "data" / "train.jsonl", assets / "data" / "eval.jsonl"
    ).require_valid()


def test_lora_training_lowers_the_loss_and_saves_a_loadable_adapter(assets, data, tmp_path):
    params = FinetuneParams(epochs=1)
    result = finetune(params, str(assets / "model"), data, tmp_path / "ft", tmp_path / "ckpt")

    assert result.steps == -(-data.train_rows // params.batch_size)
    first, last = sum(result.loss_history[:5]) / 5, sum(result.loss_history[-5:]) / 5
    assert last < first * 0.6, (first, last)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)  # B starts at zero
    model = PeftModel.from_pretrained(load_model(assets / "model"), result.adapter_dir)
    assert model.peft_config["default"].r == params.lora.r
    # The folder says what made it.
    assert json.loads((tmp_path / "ft" / "llmops_config.json").read_text())["learning_rate"] == params.learning_rate
    meta = json.loads((tmp_path / "ft" / "llmops_metadata.json").read_text())
    assert meta["dataset"]["train_md5"] == data.train_md5 and meta["steps"] == result.steps
    assert not list(tmp_path.glob("*.partial-*"))
    assert result.resumed_from_step == 0 and not list((tmp_path / "ckpt").glob("*"))  # cleaned up after success


def test_qlora_trains_on_a_4bit_base(assets, data, tmp_path):
    params = FinetuneParams(quantization="nf4", epochs=0.2)
    result = finetune(params, str(assets / "model"), data, tmp_path / "q", tmp_path / "ckpt")
    assert result.steps > 0 and all(loss == loss for loss in result.loss_history)  # no NaN
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(FinetuneParams().lora.target_modules)


def test_rows_truncated_to_no_response_are_refused(assets, data, tmp_path):
    with pytest.raises(LLMOpsError, match="max_seq_len"):
        finetune(FinetuneParams(max_seq_len=8), str(assets / "model"), data, tmp_path / "ft", tmp_path / "ckpt")
    assert not (tmp_path / "ft").exists()


RESUME_PARAMS = FinetuneParams(epochs=2, checkpoint_steps=10)


def test_killed_training_resumes_from_its_newest_checkpoint(assets, data, tmp_path):
    base = str(assets / "model")
    folder = checkpoint_folder(RESUME_PARAMS, base, data, tmp_path / "ckpt")
    script = (
        "import sys; from pathlib import Path; from llmops.config import FinetuneParams; "
        "from tasks.finetune import finetune; from tasks.validate import DatasetRef; "
        "finetune(FinetuneParams.model_validate_json(sys.argv[1]), sys.argv[2], "
        "DatasetRef.model_validate_json(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))"
    )
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            RESUME_PARAMS.model_dump_json(),
            base,
            data.model_dump_json(),
            str(tmp_path / "killed"),
            str(tmp_path / "ckpt"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (folder / "checkpoint-20" / "trainer_state.json").exists():
        assert child.poll() is None and time.monotonic() < deadline, "training ended before checkpoint 20"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "killed").exists()  # a killed stage leaves no output a later stage could trust

    resumed = finetune(RESUME_PARAMS, base, data, tmp_path / "resumed", tmp_path / "ckpt")
    assert resumed.resumed_from_step >= 20
    uninterrupted = finetune(RESUME_PARAMS, base, data, tmp_path / "straight", tmp_path / "other-ckpt")
    assert resumed.steps == uninterrupted.steps
    assert resumed.final_loss == pytest.approx(uninterrupted.final_loss, abs=0.05)


def test_incomplete_checkpoints_are_skipped_not_loaded(assets, data, tmp_path):
    base = str(assets / "model")
    folder = checkpoint_folder(RESUME_PARAMS, base, data, tmp_path / "ckpt")
    folder.mkdir(parents=True)
    # A checkpoint whose state file was cut mid-write, and one whose weights are truncated.
    (folder / "checkpoint-40").mkdir()
    (folder / "checkpoint-40" / "trainer_state.json").write_text('{"global_step": 4')
    (folder / "checkpoint-50").mkdir()
    (folder / "checkpoint-50" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-50" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00")
    assert newest_complete_checkpoint(folder) is None
    result = finetune(RESUME_PARAMS, base, data, tmp_path / "ft", tmp_path / "ckpt")
    assert result.resumed_from_step == 0 and result.steps > 50
