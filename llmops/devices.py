"""The one device policy every stage asks: where a model runs and in which floating-point type.

`model.device` and `model.dtype` in params.yaml set it for the whole pipeline. `auto` means a CUDA GPU when
one is visible, in bfloat16 where the GPU supports it (float16 on older GPUs), and the CPU in float32
otherwise. Merging is the one exception and stays in float32 on the chosen device: folding an adapter into
rounded weights would lose the update it is meant to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from llmops.errors import LLMOpsError

DeviceChoice = Literal["auto", "cpu", "cuda"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The GPTQ kernels worth trying on each device; which one a model runs with is measured on its host, once per
# model shape (`llmops.modeling.gptq_kernel`). On CUDA, Marlin, Machete (Hopper only) and ExLlamaV2 build an
# extension on first use (35 s to 3 min, cached per host); a host that cannot build them keeps Triton's, which
# compiles per shape in about a second. On the CPU, the two int4pack kernels: GPTQModel's int8 and plain-torch
# ones decoded SmolLM2-135M at a sixth of their speed on this project's 2-core machine, and are left out.
GPTQ_KERNELS = {
    "cuda": ("gptq_marlin", "gptq_machete", "gptq_exllama_v2", "gptq_triton"),
    "cpu": ("gptq_torch_fused", "gptq_torch_aten"),
}
# The kernel that packs the layers when quantizing: the checkpoint it writes is the same for every kernel.
GPTQ_PACKING_KERNELS = {"cuda": "gptq_triton", "cpu": "auto"}


@dataclass(frozen=True)
class Placement:
    """A resolved policy: `device` is "cpu" or "cuda"; `dtype` is what weights and activations use."""

    device: str
    dtype: torch.dtype

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def gptq_packing_kernel(self) -> str:
        return GPTQ_PACKING_KERNELS[self.device]

    def __str__(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"


def resolve_placement(device: DeviceChoice = "auto", dtype: DtypeChoice = "auto") -> Placement:
    """Resolve `model.device` / `model.dtype` on this host.

    Raises:
        LLMOpsError: `cuda` asked for where no CUDA GPU is visible, a type the device cannot run.
    """
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise LLMOpsError(
            "model.device is cuda, but no CUDA GPU is visible to this process (torch.cuda.is_available() is "
            "False). Set model.device: auto (or cpu) to run on the CPU, or run on a host with a GPU and a CUDA "
            "build of torch."
        )
    where = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
    bf16_ok = where == "cpu" or torch.cuda.is_bf16_supported()
    if dtype == "auto":
        chosen = torch.float32 if where == "cpu" else torch.bfloat16 if bf16_ok else torch.float16
        return Placement(where, chosen)
    if dtype == "bfloat16" and not bf16_ok:
        raise LLMOpsError(
            f"model.dtype is bfloat16, but this GPU ({torch.cuda.get_device_name()}) does not support it. "
            "Set model.dtype: auto (float16 on this GPU) or float32."
        )
    if dtype == "float16" and where == "cpu":
        raise LLMOpsError(
            "model.dtype is float16 on the CPU, where many operations have no float16 kernel. Set model.dtype: "
            "auto (float32 on the CPU) or bfloat16, or model.device: cuda."
        )
    return Placement(where, _DTYPES[dtype])
