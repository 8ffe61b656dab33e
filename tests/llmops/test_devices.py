import pytest
import torch

from llmops.config import load_params
from llmops.devices import resolve_placement
from llmops.errors import LLMOpsError
from llmops.modeling import load_model, response_perplexity
from llmops.training import TrainingJob

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the policy on a host without CUDA")


@no_cuda
def test_auto_is_the_cpu_in_float32_without_a_gpu():
    placement = resolve_placement("auto", "auto")
    assert (placement.device, placement.dtype, placement.on_gpu) == ("cpu", torch.float32, False)
    assert placement.gptq_packing_kernel == "auto"
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16


@no_cuda
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(LLMOpsError, match="model.device is cuda.*no CUDA GPU"):
        resolve_placement("cuda", "auto")


def test_float16_on_the_cpu_is_refused():
    with pytest.raises(LLMOpsError, match="float16 on the CPU"):
        resolve_placement("cpu", "float16")


def test_the_policy_is_set_in_params_and_reaches_the_training_job(params_file, tmp_path):
    params = load_params(params_file, {"model.device": "cpu", "model.dtype": "bfloat16"})
    assert (params.model.device, params.model.dtype) == ("cpu", "bfloat16")
    with pytest.raises(LLMOpsError, match="model.dtype"):
        load_params(params_file, {"model.dtype": "fp8"})
    job = TrainingJob(
        params=params.finetune,
        base_model=params.model.base,
        train_file=tmp_path / "t.jsonl",
        adapter_dir=tmp_path,
        checkpoint_dir=tmp_path,
        result_file=tmp_path / "r.json",
        error_file=tmp_path / "e.txt",
        device=params.model.device,
        dtype=params.model.dtype,
    )
    assert TrainingJob.model_validate_json(job.model_dump_json()).dtype == "bfloat16"


def test_load_model_honours_the_placement(assets):
    from llmops.data import read_conversations
    from llmops.modeling import load_tokenizer

    placement = resolve_placement("cpu", "bfloat16")
    model = load_model(assets / "model", dtype=placement.dtype, device=placement.device)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.device.type == "cpu"
    examples = read_conversations(assets / "data" / "eval")[:4]
    reference = response_perplexity(load_model(assets / "model"), load_tokenizer(assets / "model"), examples, 128)
    assert response_perplexity(model, load_tokenizer(assets / "model"), examples, 128) == pytest.approx(
        reference, rel=0.05
    )
