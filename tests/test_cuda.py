"""The GPU path, stage by stage, on the tiny model: QLoRA on a bitsandbytes NF4 base, merge, GPTQ with its
CUDA kernel, evaluation in bfloat16. Marked `cuda`: they skip with a reason where no CUDA GPU is visible,
so CI (which has none) never runs them; run them on a GPU host with `pytest -m cuda`.

They need no Great Expectations, Prefect or MLflow: the dataset reference is built from the files directly.
"""

import pytest
import torch

from llmops.chat import render_prompt
from llmops.config import EvaluateParams, FinetuneParams, MergeParams, QuantizeParams
from llmops.data import DatasetRef, read_conversations
from llmops.modeling import generate, load_model, load_tokenizer, response_perplexity

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


@pytest.fixture(scope="module")
def data(assets) -> DatasetRef:
    return DatasetRef.unvalidated(assets / "data" / "train", assets / "data" / "eval")


@pytest.fixture(scope="module")
def qlora_adapter(assets, data, tmp_path_factory):
    from tasks.finetune import finetune

    folder = tmp_path_factory.mktemp("cuda-qlora")
    return finetune(FinetuneParams(quantization="nf4", epochs=2), str(assets / "model"), data, folder / "ft", folder)


@pytest.fixture(scope="module")
def merged(assets, data, qlora_adapter, tmp_path_factory):
    from tasks.merge import merge_adapter

    folder = tmp_path_factory.mktemp("cuda-merge")
    return merge_adapter(MergeParams(), str(assets / "model"), qlora_adapter, data, folder / "merged", device="cuda")


def test_nf4_qlora_trains_on_the_gpu(qlora_adapter):
    assert qlora_adapter.placement == "cuda bfloat16"
    first, last = sum(qlora_adapter.loss_history[:3]) / 3, sum(qlora_adapter.loss_history[-3:]) / 3
    assert last < first * 0.8, (first, last)
    assert 0 < qlora_adapter.peak_memory_mb < 1024  # GPU memory allocated, for a 2M-parameter model


def test_merge_on_the_gpu_folds_the_qlora_adapter_into_full_precision_weights(assets, merged):
    assert merged.max_logit_diff <= MergeParams().tolerance
    model = load_model(merged.model_dir, device="cuda")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any("lora" in name for name, _ in model.named_parameters())
    base = load_model(assets / "model", device="cuda")
    ids = torch.tensor([render_prompt(load_tokenizer(assets / "model"), "What color is the tiger?")], device="cuda")
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def test_gptq_quantizes_reloads_and_generates_with_the_cuda_kernel(data, merged, tmp_path):
    from tasks.quantize import quantize_model

    result = quantize_model(QuantizeParams(), merged, data, tmp_path / "gptq", device="cuda")
    assert result.method == "gptq" and result.size_bytes < 0.5 * result.merged_size_bytes
    assert 0.9 < result.perplexity_ratio < 1.2
    model = load_model(result.model_dir, dtype=torch.bfloat16, device="cuda")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "TritonV2Linear" and layer.qweight.is_cuda
    prompts = [e.prompt for e in read_conversations(data.eval)[:8]]
    generations = generate(model, load_tokenizer(result.model_dir), prompts, max_new_tokens=16)
    assert len(generations) == 8 and sum(g.stopped_at_eos for g in generations) >= 6


def test_evaluation_in_bfloat16_on_the_gpu_matches_float32_on_the_cpu(assets, data, tmp_path):
    from tasks.evaluate import evaluate_models

    params = EvaluateParams(max_samples=16, max_new_tokens=12)
    model = str(assets / "model")
    gpu = evaluate_models(params, model, model, None, data, tmp_path / "gpu", device="cuda", dtype="bfloat16")
    cpu = evaluate_models(params, model, model, None, data, tmp_path / "cpu", device="cpu", dtype="float32")
    assert gpu.candidate.perplexity == pytest.approx(cpu.candidate.perplexity, rel=0.03)
    assert gpu.candidate.rouge_l == pytest.approx(cpu.candidate.rouge_l, abs=0.15)
    # Scored on the GPU in bf16: the model really ran there, in that type.
    bf16 = load_model(model, dtype=torch.bfloat16, device="cuda")
    examples = read_conversations(data.eval)[:16]
    ppl = response_perplexity(bf16, load_tokenizer(model), examples, 512)
    assert ppl == pytest.approx(gpu.candidate.perplexity, rel=1e-3)
