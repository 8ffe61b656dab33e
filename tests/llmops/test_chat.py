"""The one rendering: masks on assistant turns only, and the prompt trained on is the prompt generated from,
with the project's plain template and with chat templates (one with a system turn, one without)."""

import pytest
import torch

from llmops.chat import IGNORE_INDEX, render, render_prompt
from llmops.data import Conversation, Turn
from llmops.errors import LLMOpsError
from llmops.modeling import generate, load_model, load_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Gemma-style: no system role (the template refuses it), `model` for the assistant, an end-of-turn marker
# that is not the tokenizer's EOS.
NO_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
TWO_QUESTIONS = (
    Turn("user", "What color is the tiger?"),
    Turn("assistant", "brown"),
    Turn("user", "Classify the apple."),
    Turn("assistant", "fruit"),
)
WITH_SYSTEM = Conversation((Turn("system", "Answer with one word."), *TWO_QUESTIONS))
WITHOUT_SYSTEM = Conversation(TWO_QUESTIONS)


@pytest.fixture(scope="module")
def tokenizers(assets):
    """The tiny model's tokenizer as it is (plain template), with a ChatML template and special tokens, and
    with a template that has no system turn."""
    plain = load_tokenizer(assets / "model")
    chatml = load_tokenizer(assets / "model", CHATML)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.eos_token = "<|im_end|>"
    no_system = load_tokenizer(assets / "model", NO_SYSTEM)
    no_system.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return {"plain": plain, "chatml": chatml, "no_system": no_system}


def supervised_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_plain_template_renders_the_instruction_format(tokenizers):
    tokenizer = tokenizers["plain"]
    pair = Conversation.from_pair("What color is the tiger?", "brown")
    ids, labels = render(tokenizer, pair)
    assert tokenizer.decode(ids) == "<s> ### Instruction:\nWhat color is the tiger?\n### Response:\n brown</s>"
    assert supervised_text(tokenizer, ids, labels) == " brown</s>"
    assert labels[0] == IGNORE_INDEX and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("name", "conversation", "expected"),
    [
        ("plain", WITH_SYSTEM, " brown</s> fruit</s>"),
        ("chatml", WITH_SYSTEM, "brown<|im_end|>\nfruit<|im_end|>\n"),
        ("no_system", WITHOUT_SYSTEM, "brown<end_of_turn>\n</s>fruit<end_of_turn>\n</s>"),
    ],
)
def test_only_assistant_turns_carry_labels_each_with_an_end(tokenizers, name, conversation, expected):
    tokenizer = tokenizers[name]
    ids, labels = render(tokenizer, conversation)
    assert len(ids) == len(labels)
    # Every assistant turn, each ending in EOS (added where the template has an end-of-turn that is not EOS).
    assert supervised_text(tokenizer, ids, labels).replace(" ", "") == expected.replace(" ", "")
    assert labels.count(tokenizer.eos_token_id) == 2
    # Nothing of the system prompt, the questions or the role markers is supervised.
    prompt_side = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "tiger" in prompt_side and "apple" in prompt_side and "brown" not in prompt_side


@pytest.mark.parametrize(
    ("name", "conversation"), [("plain", WITH_SYSTEM), ("chatml", WITH_SYSTEM), ("no_system", WITHOUT_SYSTEM)]
)
def test_the_prompt_trained_on_is_the_prompt_generated_from(tokenizers, name, conversation):
    tokenizer = tokenizers[name]
    ids, labels = render(tokenizer, conversation)
    prompt = render_prompt(tokenizer, conversation.prompt)
    # At training time the last answer follows exactly these ids; everything after them is that answer.
    assert ids[: len(prompt)] == prompt
    assert all(label != IGNORE_INDEX for label in labels[len(prompt) :])
    assert labels[len(prompt) - 1] == IGNORE_INDEX


@pytest.mark.parametrize(
    ("name", "conversation"), [("plain", WITH_SYSTEM), ("chatml", WITH_SYSTEM), ("no_system", WITHOUT_SYSTEM)]
)
def test_generate_is_given_the_training_prompt_ids(assets, tokenizers, name, conversation):
    tokenizer = tokenizers[name]
    model = load_model(assets / "model")
    model.resize_token_embeddings(len(tokenizer))
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    try:
        generate(model, tokenizer, [conversation.prompt], max_new_tokens=1)
    finally:
        hook.remove()
    trained_ids, _ = render(tokenizer, conversation)
    given = seen[0][0].tolist()
    assert given == trained_ids[: len(given)] and len(given) == len(render_prompt(tokenizer, conversation.prompt))
    assert torch.is_tensor(seen[0])


def test_a_template_without_system_role_refuses_a_system_turn_clearly(tokenizers):
    with pytest.raises(LLMOpsError, match="System role not supported"):
        render(tokenizers["no_system"], WITH_SYSTEM)


def test_cut_to_max_seq_len_at_the_end(tokenizers):
    ids, labels = render(tokenizers["plain"], WITH_SYSTEM, max_seq_len=8)
    assert len(ids) == len(labels) == 8
