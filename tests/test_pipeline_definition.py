"""dvc.yaml, the config model and the flow describe one pipeline; this keeps them in agreement."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmops.config import Params

PROJECT = Path(__file__).resolve().parents[1]
# The registry stages act on outside state; ingest (drift runs only) changes the data DVC versions.
NOT_DVC_STAGES = {"ingest", "fetch_champion", "gate", "promote"}


def flow_stage_order() -> list[str]:
    source = (PROJECT / "flows" / "retrain.py").read_text()
    return re.findall(r'run\.stage\(\s*"(\w+)"', source)


def dvc_stages() -> dict:
    return yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]


def resolves(dotted: str) -> bool:
    model: type = Params
    for part in dotted.split("."):
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        if part not in fields:
            return False
        model = fields[part].annotation
    return True


def test_dvc_stages_are_the_flows_compute_stages_in_order():
    assert list(dvc_stages()) == [s for s in flow_stage_order() if s not in NOT_DVC_STAGES]
    assert flow_stage_order()[-2:] == ["gate", "promote"]


def test_each_dvc_stage_runs_its_task_module_entry_point():
    for name, stage in dvc_stages().items():
        assert stage["cmd"] == f"python -m tasks.{name}"
        assert callable(importlib.import_module(f"tasks.{name}").main)
        assert f"tasks/{name}.py" in stage["deps"]
        assert stage["outs"] == [f"${{work_dir}}/dvc/{name}"]


def test_dvc_stage_params_exist_in_the_config_model():
    for name, stage in dvc_stages().items():
        assert all(resolves(p) for p in stage["params"]), (name, stage["params"])
        assert name in stage["params"], f"{name} must read its own params.yaml section"


def test_dvc_templates_name_config_fields():
    text = (PROJECT / "dvc.yaml").read_text()
    assert all(resolves(ref) for ref in re.findall(r"\$\{([\w.]+)\}", text))


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_then_is_up_to_date(tmp_path, assets):
    for item in ("dvc.yaml", "params.yaml", "tasks", "llmops"):
        copy = shutil.copytree if (PROJECT / item).is_dir() else shutil.copy
        copy(PROJECT / item, tmp_path / item)
    shutil.copytree(assets / "model", tmp_path / "models" / "tiny-llama")
    shutil.copytree(assets / "data", tmp_path / "data" / "demo")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["finetune"]["epochs"] = 1  # the stages' wiring is under test here, not the model's quality
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)

    repro = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert repro.returncode == 0, repro.stderr[-3000:]
    report = json.loads((tmp_path / "work" / "dvc" / "evaluate" / "llmops_result.json").read_text())
    assert report["candidate"]["exact_match"] > report["base"]["exact_match"]
    again = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "Data and pipelines are up to date" in again.stdout
