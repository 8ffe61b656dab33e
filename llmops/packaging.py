"""Packaging a registered version for MLflow: the model logged with each version, and how it is logged.

`TextGenerator` is the MLflow model: prompts in, greedy replies out, with the loading and generation code that
`llmops serve` runs (`llmops.serving.generation`). `log_model` logs it in a run with the `llmops` package
shipped beside it (`code_paths`) and only public releases pinned, so `mlflow models serve` runs it in a fresh
environment without this project installed. Registering it as a version is `llmops.tracking`'s
(`register_model`). This module imports neither the HTTP app nor the tracking module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

import llmops
from llmops.errors import LLMOpsError
from llmops.serving.generation import load_generator, reply


class TextGenerator(mlflow.pyfunc.PythonModel):
    """The registered model: prompts in, greedy replies out, one per prompt. A prompt is a plain string (one
    user turn), a row with a `prompt` string, or a row with chat `messages`; give one string, a list of any of
    these, or a DataFrame of `prompt`/`messages` columns (`mlflow models serve`: `{"inputs": [...]}` or
    `{"dataframe_records": [...]}`).

    Params: `max_new_tokens` (default 64); `temperature` is accepted for API compatibility, and generation
    is greedy (the decoding the gate judged)."""

    def load_context(self, context) -> None:
        self.model, self.tokenizer = load_generator(context.artifacts["model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        conversations = [_input_conversation(row) for row in _input_rows(model_input)]
        if not conversations:
            raise LLMOpsError(
                'No prompts to answer. Give a string, a list of strings, or rows of {"prompt": "..."} or '
                '{"messages": [{"role": ..., "content": ...}]} (a list of them, or a DataFrame with those columns).'
            )
        return [g.text for g in reply(self.model, self.tokenizer, conversations, max_new_tokens)]


def _input_rows(model_input: Any) -> list[Any]:
    if isinstance(model_input, str | dict):  # one prompt
        return [model_input]
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        return model_input.to_dict(orient="records")
    return list(model_input)  # a list, or the numpy array `mlflow models serve` makes of {"inputs": [...]}


def _plain(value: Any) -> Any:
    """numpy values (as `mlflow models serve` parses JSON) as the plain Python ones they hold."""
    return value.tolist() if hasattr(value, "tolist") else value


def _input_conversation(row: Any) -> list[dict[str, str]]:
    row = _plain(row)
    if isinstance(row, str):
        return [{"role": "user", "content": row}]
    if isinstance(row, dict):
        messages, prompt = _plain(row.get("messages")), _plain(row.get("prompt", row.get(0)))
        if isinstance(messages, list) and messages:
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
    raise LLMOpsError(f"A prompt is a string, or a row with a `prompt` string or chat `messages`; got {row!r}.")


def model_signature():
    """No input schema, on purpose: MLflow drops whatever matches no column of a column schema (a plain list of
    strings would reach `predict` as no rows at all), so the input reaches `TextGenerator.predict` as sent and
    is checked there. Output: one string per prompt; params max_new_tokens, temperature."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0)]),
    )


def log_model(run_id: str, model_dir: Path) -> str:
    """Log `model_dir` as an MLflow pyfunc model (`TextGenerator`) in run `run_id`, on MLflow's current tracking
    URI; returns the logged model's URI. The `llmops` package ships with the model (`code_paths`)."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TextGenerator(),
            artifacts={"model": str(model_dir)},
            code_paths=[str(Path(llmops.__file__).parent)],
            signature=model_signature(),
            pip_requirements=_requirements(),
        )
    return info.model_uri


# What the shipped code imports to load and run a model (GPTQ checkpoints need optimum + gptqmodel).
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "optimum", "gptqmodel", "pyyaml")


def _requirements() -> list[str]:
    """Public releases only: never this project (its code ships with the model, and `llmops` on the package
    index is someone else's), and no local version tag (`2.13.0+cpu` would force a CPU build on a GPU host)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]
