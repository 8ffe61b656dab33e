import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from llmops.chat import render, render_prompt
from llmops.config import QuantizeParams, ValidateParams
from llmops.data import read_conversations
from llmops.devices import GPTQ_KERNELS
from llmops.errors import LLMOpsError
from llmops.modeling import EVAL_MAX_SEQ_LEN, generate, load_model, load_tokenizer
from tasks.merge import Fidelity, MergeResult
from tasks.quantize import calibration_set, quantize_model, reload_complete
from tasks.validate import validate_dataset


@pytest.fixture(scope="module")
def inputs(assets):
    data = validate_dataset(
        ValidateParams(), str(assets / "model"), 1024, assets / "data" / "train", assets / "data" / "eval"
    ).require_valid()
    # The bootstrapped base stands in for a merged model: same architecture, same folder layout.
    exact = Fidelity(positions=1, token_agreement=1.0, max_relative_error=0.0, mean_kl=0.0, max_logit_diff=0.0)
    return data, MergeResult(model_dir=assets / "model", fidelity=exact)


@pytest.mark.slow
def test_gptq_model_is_smaller_and_loads_with_the_kernel_measured_fastest_here(inputs, tmp_path, monkeypatch):
    """The quantize stage's reload measures the device's kernels once for this shape (one that cannot run here,
    Marlin on a CPU, is skipped with its reason); every later load takes the recorded choice."""
    data, merged = inputs
    choices = tmp_path / "gptq-kernels.json"
    monkeypatch.setattr("llmops.modeling.KERNEL_CHOICES", choices)
    monkeypatch.setitem(GPTQ_KERNELS, "cpu", ("gptq_marlin", *GPTQ_KERNELS["cpu"]))
    result = quantize_model(QuantizeParams(), merged, data, tmp_path / "gptq")
    assert result.method == "gptq"
    assert result.size_bytes < 0.5 * result.merged_size_bytes
    assert 0.9 < result.perplexity_ratio < 1.2

    [(key, measured)] = json.loads(choices.read_text()).items()
    assert set(measured["seconds"]) == {"gptq_torch_fused", "gptq_torch_aten"}
    assert list(measured["failed"]) == ["gptq_marlin"]
    assert measured["kernel"] == min(measured["seconds"], key=measured["seconds"].get)
    for kernel, layer in (("gptq_torch_fused", "TorchFusedLinear"), ("gptq_torch_aten", "TorchAtenLinear")):
        choices.write_text(json.dumps({key: {**measured, "kernel": kernel}}))
        model = load_model(result.model_dir)
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
        [generation] = generate(model, load_tokenizer(result.model_dir), ["What color is the tiger?"], 4)
        assert isinstance(generation.text, str)


def test_a_small_training_set_is_topped_up_with_answers_the_merged_model_writes(assets):
    model, tokenizer = load_model(assets / "model"), load_tokenizer(assets / "model")
    train = read_conversations(assets / "data" / "train")
    few = train[:5]
    calibration, written = calibration_set(model, tokenizer, few, 12)
    assert (len(calibration), written) == (12, 7)
    ids = [row["input_ids"][0] for row in calibration]
    # Every training row, as training renders it; then its prompts, answered again by the model itself.
    assert sorted(ids[:5]) == sorted(render(tokenizer, row, EVAL_MAX_SEQ_LEN)[0] for row in few)
    for i, extra in enumerate(ids[5:]):
        prompt = render_prompt(tokenizer, few[i % len(few)].prompt)
        assert extra[: len(prompt)] == prompt and len(extra) > len(prompt)
        assert extra not in ids[:5]  # not a copy of the training answer
    assert calibration_set(model, tokenizer, few, 12) == (calibration, written)  # seeded: the same every time

    enough, written = calibration_set(model, tokenizer, train, 12)  # a training set as large as asked
    assert written == 0 and len(enough) == 12


def test_method_none_deploys_the_merged_model(inputs, tmp_path):
    data, merged = inputs
    result = quantize_model(QuantizeParams(method="none"), merged, data, tmp_path / "none")
    assert result.model_dir == merged.model_dir and result.perplexity_ratio == 1.0
    assert not (tmp_path / "none").exists()


def test_a_reload_that_would_initialize_a_missing_parameter_fails(assets, tmp_path):
    assert reload_complete(assets / "model").config.vocab_size > 0  # a complete checkpoint reloads
    broken = tmp_path / "broken"
    shutil.copytree(assets / "model", broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LLMOpsError, match="model.layers.1.mlp.down_proj.weight"):
        reload_complete(broken)


def test_the_reload_check_names_checkpoint_keys_as_the_loader_does(tiny_architectures, tmp_path):
    # GPT-NeoX checkpoints hold the output head as `embed_out`; transformers loads it into `lm_head`.
    neox = tiny_architectures["gpt_neox"]
    weights = load_file(neox / "model.safetensors")
    assert "embed_out.weight" in weights and "lm_head.weight" not in weights
    assert reload_complete(neox).lm_head.weight.equal(weights["embed_out.weight"])
    broken = tmp_path / "broken"
    shutil.copytree(neox, broken)
    del weights["embed_out.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LLMOpsError, match="lm_head.weight"):
        reload_complete(broken)
