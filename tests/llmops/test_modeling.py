from llmops.data import Conversation
from llmops.modeling import IGNORE_INDEX, collate, encode_conversation, generate, load_model, load_tokenizer


def test_loss_is_masked_to_the_response_and_eos(assets):
    tokenizer = load_tokenizer(assets / "model")
    row = encode_conversation(tokenizer, Conversation.from_pair("What color is the tiger?", "brown"), 64)
    supervised = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert supervised[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(supervised[:-1]).strip() == "brown"
    assert row["labels"][0] == IGNORE_INDEX


def test_truncation_can_leave_no_supervised_token(assets):
    tokenizer = load_tokenizer(assets / "model")
    row = encode_conversation(tokenizer, Conversation.from_pair("What color is the tiger?", "brown"), 8)
    assert len(row["input_ids"]) == 8
    assert all(label == IGNORE_INDEX for label in row["labels"])


def test_collate_pads_and_masks(assets):
    tokenizer = load_tokenizer(assets / "model")
    rows = [
        encode_conversation(tokenizer, Conversation.from_pair("Classify the tiger.", r), 64)
        for r in ("animal", "a big")
    ]
    batch = collate(rows, tokenizer.pad_token_id)
    short = len(rows[0]["input_ids"])
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()


def test_generation_decodes_only_the_completion(assets):
    tokenizer = load_tokenizer(assets / "model")
    [generation] = generate(load_model(assets / "model"), tokenizer, ["What color is the tiger?"], 6)
    assert "###" not in generation.text and "tiger?" not in generation.text
