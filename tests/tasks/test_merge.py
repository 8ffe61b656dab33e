import pytest
import torch

from llmops.config import FinetuneParams, MergeParams, ValidateParams
from llmops.modeling import format_prompt, load_model, load_tokenizer
from tasks.finetune import finetune
from tasks.merge import MergeFidelityError, merge_adapter
from tasks.validate import validate_dataset


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    data = validate_dataset(
        ValidateParams(), str(assets / "model"), 64, assets / "data" / "train.jsonl", assets / "data" / "eval.jsonl"
    ).require_valid()
    folder = tmp_path_factory.mktemp("ft")
    adapter = finetune(FinetuneParams(epochs=1), str(assets / "model"), data, folder / "ft", folder / "ckpt")
    return data, adapter


def test_merged_model_reproduces_the_adapter_model(assets, trained, tmp_path):
    data, adapter = trained
    result = merge_adapter(MergeParams(), str(assets / "model"), adapter, data, tmp_path / "merged")
    assert 0 <= result.max_logit_diff <= MergeParams().tolerance

    # Independently of the stage's own check: the merged folder is a plain model (no adapter left) whose
    # logits differ from the base model's, so the adapter's update really was folded in.
    merged, base = load_model(result.model_dir), load_model(assets / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = load_tokenizer(result.model_dir)(format_prompt("What color is the tiger?"), return_tensors="pt")
    assert not torch.allclose(merged(**ids).logits, base(**ids).logits, atol=1e-3)


def test_fidelity_failure_stops_the_stage_and_writes_nothing(assets, trained, tmp_path):
    data, adapter = trained
    with pytest.raises(MergeFidelityError, match="merge.tolerance"):
        merge_adapter(MergeParams(tolerance=1e-12), str(assets / "model"), adapter, data, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
