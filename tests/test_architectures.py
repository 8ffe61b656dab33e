"""Any base model: every common architecture runs every model stage with the shipped defaults."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import pytest

from llmops.config import (
    EvaluateParams,
    FinetuneParams,
    LoraParams,
    MergeParams,
    QuantizeParams,
    ValidateParams,
    load_params,
)
from llmops.data import read_conversations, write_jsonl
from llmops.errors import LLMOpsError
from llmops.modeling import generate, load_model, load_tokenizer
from llmops.training import linear_layers
from tasks.evaluate import evaluate_models
from tasks.finetune import finetune
from tasks.merge import merge_adapter
from tasks.quantize import quantize_model
from tasks.validate import validate_dataset
from tests.architectures import ARCHITECTURES
from tests.conftest import PROJECT, register, training_processes, write_params


@pytest.fixture(scope="module")
def few_rows(assets, tmp_path_factory):
    """48 training rows and 12 eval rows of the demo data: enough for one epoch and a GPTQ calibration."""
    folder = tmp_path_factory.mktemp("few-rows")
    write_jsonl(folder / "train.jsonl", read_conversations(assets / "data" / "train")[:48])
    write_jsonl(folder / "eval.jsonl", read_conversations(assets / "data" / "eval")[:12])
    return validate_dataset(
        ValidateParams(), str(assets / "model"), 1024, folder / "train.jsonl", folder / "eval.jsonl"
    ).require_valid()


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_stage_runs_on_the_architecture(architecture, tiny_architectures, few_rows, tmp_path, assets):
    base = str(tiny_architectures[architecture])
    adapter = finetune(FinetuneParams(epochs=1), base, few_rows, tmp_path / "ft", tmp_path / "ckpt")
    # all-linear: every linear layer kind of the model got an adapter, the output head none.
    kinds = {name.rsplit(".", 1)[-1] for name in linear_layers(base)}
    assert set(adapter.target_modules.adapted) == kinds and not adapter.target_modules.not_adapted
    saved = json.loads((adapter.adapter_dir / "adapter_config.json").read_text())["target_modules"]
    assert {name.rsplit(".", 1)[-1] for name in saved} == kinds and not any("lm_head" in name for name in saved)

    merged = merge_adapter(MergeParams(), base, adapter, few_rows, tmp_path / "merged")
    assert not merged.fidelity.problems(MergeParams())
    assert (merged.model_dir / "generation_config.json").is_file()

    deployable = quantize_model(QuantizeParams(), merged, few_rows, tmp_path / "gptq")
    assert deployable.method == "gptq" and deployable.size_bytes < deployable.merged_size_bytes
    if architecture == "gemma":  # 16-wide key/value projections cannot be packed: kept, and said so
        assert set(deployable.full_precision_layers) == {"self_attn.k_proj", "self_attn.v_proj"}
    else:
        assert deployable.full_precision_layers == []
    assert (deployable.model_dir / "generation_config.json").is_file()
    [generation] = generate(load_model(deployable.model_dir), load_tokenizer(deployable.model_dir), ["Hi?"], 4)
    assert isinstance(generation.text, str)

    report = evaluate_models(EvaluateParams(), deployable.model_dir, base, None, few_rows, tmp_path / "eval")
    assert report.candidate.perplexity > 1

    # Registered as the promote stage registers a candidate that passed, it loads back through MLflow and answers.
    params = load_params(write_params(tmp_path, assets))
    version = register(params, deployable.model_dir)
    model = mlflow.pyfunc.load_model(f"models:/{params.registry.model_name}/{version}")
    [answer] = model.predict([{"prompt": "Hi?"}], params={"max_new_tokens": 4})
    assert isinstance(answer, str)


def test_wrong_target_modules_fail_before_training_with_the_model_layer_names(tiny_architectures, few_rows, tmp_path):
    base = str(tiny_architectures["gpt2"])
    params = FinetuneParams(lora=LoraParams(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(LLMOpsError) as caught:
        finetune(params, base, few_rows, tmp_path / "ft", tmp_path / "ckpt")
    message = str(caught.value)
    assert "q_proj" in message and "c_attn, c_fc, c_proj" in message and "all-linear" in message
    assert type(caught.value) is LLMOpsError and caught.value.exit_code == 2
    assert not training_processes() and not (tmp_path / "ft").exists() and not (tmp_path / "ckpt").exists()


def test_an_explicit_list_that_leaves_layers_out_says_which(tiny_architectures, few_rows, tmp_path):
    base = str(tiny_architectures["opt"])
    params = FinetuneParams(epochs=0.3, lora=LoraParams(target_modules=["q_proj", "v_proj"]))
    result = finetune(params, base, few_rows, tmp_path / "ft", tmp_path / "ckpt")
    assert result.target_modules.adapted == ["q_proj", "v_proj"]
    assert result.target_modules.not_adapted == ["fc1", "fc2", "k_proj", "out_proj"]
    assert result.target_modules.adapted_layers == 4  # 2 blocks x 2


def test_a_shape_mismatch_in_training_is_a_crash_reported_in_one_line_and_not_retried(
    tiny_architectures, few_rows, tmp_path
):
    """An exception in the training process that is not bad input: exit 1 with its message, no OOM guess."""
    import shutil

    from tasks.finetune import TrainingFailed, TrainingRaised

    broken = tmp_path / "broken"
    shutil.copytree(tiny_architectures["llama"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96  # the checkpoint's MLP weights are 128 wide
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainingRaised) as caught:
        finetune(FinetuneParams(epochs=1), str(broken), few_rows, tmp_path / "ft", tmp_path / "ckpt")
    assert not isinstance(caught.value, TrainingFailed) and caught.value.exit_code == 1
    assert "out-of-memory" not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_llmops_run_on_another_architecture_exits_0_and_wrong_targets_exit_2(assets, tiny_architectures, tmp_path):
    """The CLI as a user runs it: `--set model.base=...` and nothing else."""
    params_file = write_params(tmp_path, assets, finetune__epochs=1)
    cli = [sys.executable, "-m", "llmops.cli", "--params", str(params_file), "run"]
    env = {"PYTHONPATH": str(PROJECT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    # The CPU packing kernel GPTQModel compiles on first use belongs to the machine, not to a home folder.
    env["GPTQMODEL_TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "gptqmodel" / "torch_extensions")
    ok = subprocess.run(
        [*cli, "--set", f"model.base={tiny_architectures['gpt2']}"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]

    neox = f"model.base={tiny_architectures['gpt_neox']}"
    wrong = subprocess.run(
        [*cli, "--set", neox, "--set", "finetune.lora.target_modules=[q_proj]"], capture_output=True, text=True, env=env
    )
    assert wrong.returncode == 2, wrong.stdout[-3000:] + wrong.stderr[-3000:]
    assert "query_key_value" in wrong.stderr + wrong.stdout
    assert "Traceback" not in wrong.stderr + wrong.stdout
    assert "Retrying" not in wrong.stderr + wrong.stdout and "attempt" not in wrong.stderr.lower()
