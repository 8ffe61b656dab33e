"""Tiny random-weight models of common architectures (2 layers, 64 wide), built from transformers configs and
sharing the bootstrap tokenizer: what a user brings as `model.base`, small enough to run every stage."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)

WIDTH, LAYERS, HEADS, FFN, POSITIONS = 64, 2, 4, 128, 512
DECODER = {
    "hidden_size": WIDTH,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": FFN,
    "max_position_embeddings": POSITIONS,
}

ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**DECODER, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**DECODER, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**DECODER, num_key_value_heads=2, sliding_window=None),
    # One 16-wide key/value head: its k/v projections are too narrow for GPTQ's packing, so stay full precision.
    "gemma": lambda: GemmaConfig(**DECODER, num_key_value_heads=1, head_dim=16),
    "phi3": lambda: Phi3Config(**DECODER, num_key_value_heads=4, pad_token_id=0),
    "gpt2": lambda: GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS),
    "gpt_neox": lambda: GPTNeoXConfig(**DECODER, rotary_pct=0.5),
    "opt": lambda: OPTConfig(
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=FFN,
        word_embed_proj_dim=WIDTH,
        max_position_embeddings=POSITIONS,
    ),
}


def build_tiny_model(architecture: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random-weight model of `architecture` with the tokenizer of `tokenizer_dir`, saved to `out`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = ARCHITECTURES[architecture]()
    config.vocab_size = len(tokenizer)
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    for name, token_id in special.items():
        setattr(config, f"{name}_token_id", token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
