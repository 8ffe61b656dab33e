from pathlib import Path

import pytest
import yaml

from llmops.config import Params, load_params, parse_overrides
from llmops.errors import LLMOpsError

PROJECT = Path(__file__).resolve().parents[2]


def test_shipped_params_file_loads_and_matches_the_defaults():
    params = load_params(PROJECT / "params.yaml")
    # Every section of the file is a section of the model and vice versa.
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert set(raw) == {field.alias or name for name, field in Params.model_fields.items()}
    assert params.finetune.lora.r == raw["finetune"]["lora"]["r"]


def test_relative_paths_are_anchored_at_the_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("data: {train: d/train.jsonl, eval: d/eval.jsonl}\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.data.train == tmp_path / "d" / "train.jsonl"
    assert params.work_dir == tmp_path / "work"
    assert params.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_overrides_apply_and_are_validated(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("finetune: {learning_rate: 0.001}\n")
    assert load_params(path, {"finetune.learning_rate": 5e-4}).finetune.learning_rate == 5e-4
    assert load_params(path, {"finetune.lora.r": 4}).finetune.lora.r == 4


@pytest.mark.parametrize(
    ("text", "overrides", "named"),
    [
        ("finetune: {lr: 0.1}\n", {}, "finetune.lr"),
        ("finetune: {learning_rate: -1}\n", {}, "finetune.learning_rate"),
        ("", {"quantize.method": "awq"}, "quantize.method"),
        ("", {"quantize.group_size": 48}, "group_size"),
        ("", {"bootstrap.num_heads": 3}, "hidden_size"),
        ("nonsense: 1\n", {}, "nonsense"),
        ("finetune: 3\n", {"finetune.epochs": 1}, "finetune"),
        ("- a list\n", {}, "mapping"),
        ("finetune: {epochs: [unclosed\n", {}, "not valid YAML"),
        ("", {"deploy.retrain_cron": "61 * * * *"}, "retrain_cron '61"),
        ("", {"deploy.timezone": "Mars/Olympus"}, "unknown time zone"),
        ("", {"monitor.length_p_value": 0}, "monitor.length_p_value"),
        ("", {"finetune.quantization": "nf4", "finetune.distributed": {"processes": 2, "zero_stage": 3}}, "ZeRO-3"),
        ("", {"finetune.distributed.offload_params": True}, "zero_stage: 3"),
        ("", {"finetune.distributed.processes": 3}, "multiple of micro_batch_size x processes"),
        ("", {"finetune.micro_batch_size": 5}, "multiple of micro_batch_size"),
        ("", {"finetune.precision": "fp16"}, "finetune.precision"),
        ("", {"serve.default_max_tokens": 512}, "default_max_tokens"),
    ],
)
def test_invalid_params_name_the_field(tmp_path, text, overrides, named):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(LLMOpsError, match=named.replace(".", r"\.")):
        load_params(path, overrides)


def test_a_relative_hostfile_is_anchored_at_the_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("finetune: {distributed: {processes: 8, hostfile: hosts/train}}\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.finetune.distributed.hostfile == tmp_path / "hosts" / "train"
    assert params.finetune.distributed.uses_deepspeed


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(LLMOpsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_parse_overrides_reads_yaml_scalars():
    assert parse_overrides(["a.b=1e-4", "c=true", "d=[x, y]", "e=text"]) == {
        "a.b": 1e-4,
        "c": True,
        "d": ["x", "y"],
        "e": "text",
    }
    with pytest.raises(LLMOpsError, match="key=value"):
        parse_overrides(["finetune.learning_rate"])


def test_environment_overrides_tracking_for_deployment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPS_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("LLMOPS_REGISTERED_MODEL", "support-bot")
    (tmp_path / "params.yaml").write_text("")
    params = load_params(tmp_path / "params.yaml")
    assert params.tracking.uri == "http://mlflow.internal:5000"
    assert params.registry.model_name == "support-bot"


def test_digest_changes_with_any_value(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    path = tmp_path / "params.yaml"
    assert load_params(path).digest() == load_params(path).digest()
    assert load_params(path).digest() != load_params(path, {"finetune.seed": 1}).digest()
