import json

import pytest
from peft import PeftModel
from safetensors.torch import load_file

from llmops.config import FinetuneParams, ValidateParams
from llmops.errors import LLMOpsError
from llmops.modeling import load_model
from tasks.finetune import finetune
from tasks.validate import validate_dataset


@pytest.fixture(scope="module")
def data(assets):
    return validate_dataset(
        ValidateParams(), str(assets / "model"), 64, assets / "data" / "train.jsonl", assets / "data" / "eval.jsonl"
    ).require_valid()


def test_lora_training_lowers_the_loss_and_saves_a_loadable_adapter(assets, data, tmp_path):
    params = FinetuneParams(epochs=1)
    result = finetune(params, str(assets / "model"), data, tmp_path / "ft")

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


def test_qlora_trains_on_a_4bit_base(assets, data, tmp_path):
    result = finetune(FinetuneParams(quantization="nf4", epochs=0.2), str(assets / "model"), data, tmp_path / "q")
    assert result.steps > 0 and all(loss == loss for loss in result.loss_history)  # no NaN
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(FinetuneParams().lora.target_modules)


def test_rows_truncated_to_no_response_are_refused(assets, data, tmp_path):
    with pytest.raises(LLMOpsError, match="max_seq_len"):
        finetune(FinetuneParams(max_seq_len=8), str(assets / "model"), data, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
