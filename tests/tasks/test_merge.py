import pytest
import torch

from llmops.chat import render_prompt
from llmops.config import MergeParams
from llmops.modeling import load_model, load_tokenizer
from tasks.merge import MergeFidelityError, merge_adapter


def test_merged_model_reproduces_the_adapter_model(assets, demo_data, one_epoch_adapter, tmp_path):
    data, adapter = demo_data, one_epoch_adapter
    result = merge_adapter(MergeParams(), str(assets / "model"), adapter, data, tmp_path / "merged")
    assert 0 <= result.max_logit_diff <= MergeParams().tolerance

    # Independently of the stage's own check: the merged folder is a plain model (no adapter left) whose
    # logits differ from the base model's, so the adapter's update really was folded in.
    merged, base = load_model(result.model_dir), load_model(assets / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = {"input_ids": torch.tensor([render_prompt(load_tokenizer(result.model_dir), "What color is the tiger?")])}
    assert not torch.allclose(merged(**ids).logits, base(**ids).logits, atol=1e-3)


def test_fidelity_failure_stops_the_stage_and_writes_nothing(assets, demo_data, one_epoch_adapter, tmp_path):
    data, adapter = demo_data, one_epoch_adapter
    with pytest.raises(MergeFidelityError, match="merge.tolerance"):
        merge_adapter(MergeParams(tolerance=1e-12), str(assets / "model"), adapter, data, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
