import pytest
import torch

from llmops.config import MergeParams
from llmops.modeling import format_prompt, load_model, load_tokenizer
from tasks.merge import MergeFidelityError, merge_adapter


def test_merged_model_reproduces_the_adapter_model(assets, demo_data, one_epoch_adapter, tmp_path):
    data, adapter = demo_data, one_epoch_adapter
    result = merge_adapter(MergeParams(), str(assets / "model"), adapter, data, tmp_path / "merged")
    assert 0 <= result.max_logit_diff <= MergeParams().tolerance

    # Independently of the stage's own check: the merged folder is a plain model (no adapter left) whose
    # logits differ from the base model's, so the adapter's update really was folded in.
    merged, base = load_model(result.model_dir), load_model(assets / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = load_tokenizer(result.model_dir)(format_prompt("What color is the tiger?"), return_tensors="pt")
    assert not torch.allclose(merged(**ids).logits, base(**ids).logits, atol=1e-3)


def test_fidelity_failure_stops_the_stage_and_writes_nothing(assets, demo_data, one_epoch_adapter, tmp_path):
    data, adapter = demo_data, one_epoch_adapter
    with pytest.raises(MergeFidelityError, match="merge.tolerance"):
        merge_adapter(MergeParams(tolerance=1e-12), str(assets / "model"), adapter, data, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
