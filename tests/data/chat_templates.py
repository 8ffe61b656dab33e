"""The chat templates of common model families, as their tokenizer_config.json ships them (public Jinja text,
copied so the tests need no hub), and a tokenizer for each: a real one with the family's special tokens added."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmops.modeling import load_tokenizer


@dataclass(frozen=True)
class Family:
    template: str
    special_tokens: tuple[str, ...]  # the template's control tokens, added to the tokenizer as special
    bos: str | None
    eos: str


# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen/Qwen2-7B-Instruct: ChatML, with a default system turn when the conversation has none.
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
    "\n' }}{% endif %}"
)
# HuggingFaceTB/SmolLM2-135M-Instruct: ChatML, its own default system turn.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# mistralai/Mistral-7B-Instruct-v0.1 (current): an optional system turn, then strict user/assistant alternation.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set "
    "loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- "
    "bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == "
    "0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/"
    "assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if "
    "loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + "
    "message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' "
    "[/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + "
    "message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles "
    "are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor "
    "%}\n"
)
# google/gemma-7b-it: no system role, strict alternation, `model` for the assistant.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% "
    "endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "(message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif "
    "%}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if "
    "add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# microsoft/Phi-3-mini-4k-instruct: closes a conversation with EOS, which a prompt does not have.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor "
    "%}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
FAMILIES = {
    "llama3": Family(LLAMA3, ("<|start_header_id|>", "<|end_header_id|>"), "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": Family(QWEN2, CHATML_TOKENS, None, "<|im_end|>"),
    "smollm2": Family(SMOLLM2, CHATML_TOKENS, "<|im_start|>", "<|im_end|>"),
    "mistral": Family(MISTRAL, (), "<s>", "</s>"),
    "gemma": Family(GEMMA, ("<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>"),
    "phi3": Family(PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<s>", "<|endoftext|>"),
}
SYSTEM_ROLE = {name: name != "gemma" for name in FAMILIES}  # Gemma's template refuses a system turn
OPENING_ASSISTANT = {"phi3"}  # the only ones that render a conversation opening with the assistant consistently


def family_tokenizer(tokenizer_dir: Path, name: str):
    """The tokenizer of `tokenizer_dir` (a real, fast one) speaking the family's template: its control tokens,
    BOS and EOS added as special tokens."""
    family = FAMILIES[name]
    tokenizer = load_tokenizer(tokenizer_dir, family.template)
    special = {"eos_token": family.eos, "additional_special_tokens": list(family.special_tokens)}
    if family.bos:
        special["bos_token"] = family.bos
    tokenizer.add_special_tokens(special)
    return tokenizer
