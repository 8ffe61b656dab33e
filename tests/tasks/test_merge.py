import json
import shutil

import pytest
import torch
from peft import PeftModel

from llmops.chat import render_prompt
from llmops.config import MergeParams
from llmops.data import read_conversations
from llmops.modeling import load_model, load_tokenizer
from tasks.merge import MergeFidelityError, compare_logits, merge_adapter, prompt_logits


def test_merged_model_reproduces_the_adapter_model(assets, demo_data, one_epoch_adapter, tmp_path):
    data, adapter = demo_data, one_epoch_adapter
    result = merge_adapter(MergeParams(), str(assets / "model"), adapter, data, tmp_path / "merged")
    assert not result.fidelity.problems(MergeParams())
    assert result.fidelity.token_agreement == 1.0 and result.fidelity.positions > 8 * 5
    meta = json.loads((result.model_dir / "llmops_metadata.json").read_text())
    assert meta["fidelity"]["mean_kl"] == result.fidelity.mean_kl  # the figures travel with the artifact

    # Independently of the stage's own check: the merged folder is a plain model (no adapter left) whose
    # logits differ from the base model's, so the adapter's update really was folded in.
    merged, base = load_model(result.model_dir), load_model(assets / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = {"input_ids": torch.tensor([render_prompt(load_tokenizer(result.model_dir), "What color is the tiger?")])}
    assert not torch.allclose(merged(**ids).logits, base(**ids).logits, atol=1e-3)
    assert (result.model_dir / "generation_config.json").is_file()


def scaled_adapter(adapter_dir, folder, factor: float):
    """A copy of the adapter whose update is `factor` times larger (lora_alpha scaled)."""
    shutil.copytree(adapter_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] *= factor
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def check_inputs(assets, one_epoch_adapter, demo_data):
    tokenizer = load_tokenizer(assets / "model")
    prompts = [e.prompt for e in read_conversations(demo_data.eval)[:8]]
    return tokenizer, prompts


def adapter_and_merged(base, adapter_dir, tokenizer, prompts):
    model = PeftModel.from_pretrained(load_model(base), adapter_dir)
    reference = prompt_logits(model, tokenizer, prompts)
    return reference, model.merge_and_unload()


def test_the_check_passes_a_far_trained_adapter(assets, one_epoch_adapter, check_inputs, tmp_path):
    """An update 20 times larger than one epoch's (what long training reaches) still merges within bounds:
    the bounds follow the logits' magnitude, not an absolute figure fitted to a short run."""
    tokenizer, prompts = check_inputs
    far = scaled_adapter(one_epoch_adapter.adapter_dir, tmp_path / "far", 20)
    reference, merged = adapter_and_merged(assets / "model", far, tokenizer, prompts)
    fidelity = compare_logits(reference, prompt_logits(merged, tokenizer, prompts))
    assert not fidelity.problems(MergeParams()), fidelity


def test_the_check_fails_a_wrong_scaling_and_a_dropped_layer(assets, one_epoch_adapter, check_inputs, tmp_path):
    tokenizer, prompts = check_inputs
    reference, merged = adapter_and_merged(assets / "model", one_epoch_adapter.adapter_dir, tokenizer, prompts)

    # A merge that applied the update at twice its scale (alpha/r taken as 2 alpha/r).
    twice = scaled_adapter(one_epoch_adapter.adapter_dir, tmp_path / "twice", 2)
    _, wrongly_scaled = adapter_and_merged(assets / "model", twice, tokenizer, prompts)
    assert compare_logits(reference, prompt_logits(wrongly_scaled, tokenizer, prompts)).problems(MergeParams())

    # A merge that left one layer's update out: that layer keeps the base's weight.
    base = load_model(assets / "model")
    merged.model.layers[1].mlp.down_proj.weight.data.copy_(base.model.layers[1].mlp.down_proj.weight)
    dropped = compare_logits(reference, prompt_logits(merged, tokenizer, prompts))
    assert any("relative logit error" in problem for problem in dropped.problems(MergeParams())), dropped


def test_fidelity_failure_stops_the_stage_and_writes_nothing(assets, demo_data, one_epoch_adapter, tmp_path):
    data, adapter = demo_data, one_epoch_adapter
    with pytest.raises(MergeFidelityError, match="merge.max_relative_error"):
        merge_adapter(MergeParams(max_relative_error=1e-15), str(assets / "model"), adapter, data, tmp_path / "m")
    assert not (tmp_path / "m").exists()
