"""The one rendering: the ids are the ids `apply_chat_template(..., tokenize=True)` gives, with the real chat
templates of the common families (tests/data/chat_templates.py) and the project's plain one; masks on the
assistant turns that train; the prompt trained on is the prompt generated from; a conversation that opens
with the assistant renders as it is where the template allows it."""

import pytest
import torch

from llmops.chat import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    TemplateRefused,
    count_tokens,
    end_of_turn_ids,
    render,
    render_prompt,
    render_text,
)
from llmops.data import Conversation, Turn
from llmops.modeling import generate, load_model, load_tokenizer, stop_token_ids
from tests.conftest import PROJECT
from tests.data.chat_templates import FAMILIES, OPENING_ASSISTANT, SMOLLM2, SYSTEM_ROLE, family_tokenizer

SYSTEM = Turn("system", "Answer with one word.")
TWO_QUESTIONS = (
    Turn("user", "What color is the tiger?"),
    Turn("assistant", "brown"),
    Turn("user", "Classify the apple."),
    Turn("assistant", "fruit"),
)
WITH_SYSTEM = Conversation((SYSTEM, *TWO_QUESTIONS))
WITHOUT_SYSTEM = Conversation(TWO_QUESTIONS)
OPENING = Conversation((Turn("assistant", "Hello! How can I help?"), *TWO_QUESTIONS))
NAMES = [*FAMILIES, "plain"]
REAL_MODEL = PROJECT / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizers(assets):
    """The tiny model's tokenizer as it is (plain template), and speaking each family's template."""
    return {"plain": load_tokenizer(assets / "model")} | {
        name: family_tokenizer(assets / "model", name) for name in FAMILIES
    }


def conversation_for(name: str) -> Conversation:
    return WITH_SYSTEM if SYSTEM_ROLE.get(name, True) else WITHOUT_SYSTEM


def applied(tokenizer, turns, generation_prompt: bool = False) -> list[int]:
    """What a server using the template sends: `apply_chat_template(..., tokenize=True)`."""
    return tokenizer.apply_chat_template(
        [t.as_message() for t in turns],
        chat_template=tokenizer.chat_template or PLAIN_TEMPLATE,
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=False,
    )


def supervised_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


@pytest.mark.parametrize("name", NAMES)
def test_the_ids_are_the_ids_apply_chat_template_gives(tokenizers, name):
    tokenizer = tokenizers[name]
    for conversation in (conversation_for(name), WITHOUT_SYSTEM, Conversation(TWO_QUESTIONS[:2])):
        ids, labels = render(tokenizer, conversation)
        assert ids == applied(tokenizer, conversation.turns) and len(labels) == len(ids)
        prompt = render_prompt(tokenizer, conversation.prompt)
        assert prompt == applied(tokenizer, conversation.prompt, generation_prompt=True)


def test_plain_template_renders_the_instruction_format_as_one_text(tokenizers):
    """The whole text is tokenized at once (as apply_chat_template does); the answer starts a word."""
    tokenizer = tokenizers["plain"]
    ids, labels = render(tokenizer, Conversation.from_pair("What color is the tiger?", "brown"))
    text = render_text(tokenizer, (Turn("user", "What color is the tiger?"), Turn("assistant", "brown"))).text
    assert text == "<s>### Instruction:\nWhat color is the tiger?\n### Response:\n brown</s>"
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert supervised_text(tokenizer, ids, labels) == " brown</s>"
    assert labels[0] == IGNORE_INDEX and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain", " brown</s> fruit</s>"),
        ("llama3", "brown<|eot_id|>fruit<|eot_id|>"),
        ("qwen2", "brown<|im_end|>\nfruit<|im_end|>\n"),
        ("smollm2", "brown<|im_end|>\nfruit<|im_end|>\n"),
        ("mistral", " brown</s> fruit</s>"),
        ("gemma", "brown<end_of_turn>\nfruit<end_of_turn>\n"),
        # Phi-3 closes a whole conversation with EOS, never a turn: that EOS follows the last answer.
        ("phi3", "brown<|end|>\nfruit<|end|>\n<|endoftext|>"),
    ],
)
def test_only_assistant_turns_carry_labels_each_ending_where_generation_stops(tokenizers, name, expected):
    tokenizer = tokenizers[name]
    ids, labels = render(tokenizer, conversation_for(name))
    # Every assistant turn with the template's end of turn, and nothing else (spaces aside: decoding).
    assert supervised_text(tokenizer, ids, labels).replace(" ", "") == expected.replace(" ", "")
    stops = set(end_of_turn_ids(tokenizer))
    assert sum(label in stops for label in labels) >= 2
    prompt_side = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "tiger" in prompt_side and "apple" in prompt_side and "brown" not in prompt_side


@pytest.mark.parametrize("name", NAMES)
def test_the_prompt_trained_on_is_the_prompt_generated_from(tokenizers, name):
    tokenizer = tokenizers[name]
    conversation = conversation_for(name)
    ids, labels = render(tokenizer, conversation)
    prompt = render_prompt(tokenizer, conversation.prompt)
    # At training time the last answer follows exactly these ids; everything after them is that answer.
    assert ids[: len(prompt)] == prompt
    assert all(label != IGNORE_INDEX for label in labels[len(prompt) :])
    assert labels[len(prompt) - 1] == IGNORE_INDEX


@pytest.mark.parametrize("name", NAMES)
def test_an_assistant_turn_that_is_context_is_rendered_but_never_learned(tokenizers, name):
    tokenizer = tokenizers[name]
    turns = conversation_for(name).turns
    context = Conversation(tuple(replace_train(t, t.content != "brown") for t in turns))
    ids, labels = render(tokenizer, context)
    assert ids == render(tokenizer, conversation_for(name))[0]  # the same text
    assert "brown" in tokenizer.decode(ids) and "brown" not in supervised_text(tokenizer, ids, labels)
    assert "fruit" in supervised_text(tokenizer, ids, labels)


def replace_train(turn: Turn, train: bool) -> Turn:
    return Turn(turn.role, turn.content, train=train)


@pytest.mark.parametrize("name", NAMES)
def test_a_conversation_opening_with_the_assistant_renders_as_it_is_or_is_refused(tokenizers, name):
    tokenizer = tokenizers[name]
    if name in OPENING_ASSISTANT or name == "plain":
        ids, labels = render(tokenizer, OPENING)
        assert ids == applied(tokenizer, OPENING.turns)
        assert "Hello! How can I help?" in supervised_text(tokenizer, ids, labels)  # the loss covers it too
    else:  # strict alternation raises; a default system turn renders the start differently once turns follow
        with pytest.raises(TemplateRefused):
            render(tokenizer, OPENING)
        assert render(tokenizer, OPENING.without_opening_assistant_turns())[0] == render(tokenizer, WITHOUT_SYSTEM)[0]


@pytest.mark.parametrize("name", NAMES)
def test_batch_counts_are_the_rendered_lengths(tokenizers, name):
    tokenizer = tokenizers[name]
    conversations = [conversation_for(name), WITHOUT_SYSTEM, Conversation(TWO_QUESTIONS[:2])]
    counts = count_tokens(tokenizer, [render_text(tokenizer, c.turns) for c in conversations])
    for conversation, count in zip(conversations, counts, strict=True):
        assert count.total == len(render(tokenizer, conversation)[0])
        assert count.prompt == len(render_prompt(tokenizer, conversation.prompt))


def test_a_template_that_ends_answers_with_no_special_token_gets_eos_appended(assets):
    bare = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer = load_tokenizer(assets / "model", bare)
    ids, labels = render(tokenizer, WITHOUT_SYSTEM)
    assert labels.count(tokenizer.eos_token_id) == 2 and len(ids) == len(applied(tokenizer, WITHOUT_SYSTEM.turns)) + 2
    [count] = count_tokens(tokenizer, [render_text(tokenizer, WITHOUT_SYSTEM.turns)])
    assert count.total == len(ids)


def test_a_template_without_system_role_refuses_a_system_turn_clearly(tokenizers):
    with pytest.raises(TemplateRefused, match="System role not supported"):
        render(tokenizers["gemma"], WITH_SYSTEM)


def test_cut_to_max_seq_len_at_the_end(tokenizers):
    ids, labels = render(tokenizers["plain"], WITH_SYSTEM, max_seq_len=8)
    assert len(ids) == len(labels) == 8


@pytest.mark.parametrize("name", ["plain", "smollm2", "gemma"])
def test_generate_is_given_the_training_prompt_ids_and_stops_at_the_end_of_turn(assets, tokenizers, name):
    tokenizer = tokenizers[name]
    conversation = conversation_for(name)
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
    assert set(end_of_turn_ids(tokenizer)) <= set(stop_token_ids(tokenizer, model))


@pytest.mark.skipif(not (REAL_MODEL / "config.json").exists(), reason="run `make real-model` (make test does)")
def test_the_real_smollm2_tokenizer_and_template():
    tokenizer = load_tokenizer(REAL_MODEL)
    assert tokenizer.chat_template == SMOLLM2
    for conversation in (WITH_SYSTEM, WITHOUT_SYSTEM):
        ids, labels = render(tokenizer, conversation)
        assert ids == applied(tokenizer, conversation.turns)
        assert render_prompt(tokenizer, conversation.prompt) == applied(tokenizer, conversation.prompt, True)
        assert supervised_text(tokenizer, ids, labels) == "brown<|im_end|>\nfruit<|im_end|>\n"
