"""Build the default base model and the demo dataset locally, since no model or dataset hub is reachable.

The demo follows how instruction tuning works on real models: pre-training gives knowledge, fine-tuning
teaches the format that retrieves it. The base model (a small Llama-architecture causal LM with a byte-level
BPE tokenizer trained here) is pre-trained on plain sentences stating facts about 48 entities: each one's
kind and color. The instruction dataset asks about those facts in question templates the base has never
seen; the eval split holds out (question, entity) pairs that fine-tuning never shows. The base knows the
facts but rambles past the answer, so its exact match is low; a LoRA fine-tune that learns to answer in
one word and stop raises it, which is what the gate checks.

The dataset is shaped like a team's chat export: `messages` rows with a system prompt, a quarter of them
two-question conversations (the loss covers both answers; evaluation asks the last question).
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmops.config import DEFAULT_PARAMS, BootstrapParams, load_params
from llmops.data import Conversation, Turn, write_jsonl
from llmops.files import atomic_dir, write_stage_metadata

log = logging.getLogger(__name__)

KINDS = {
    "animal": "tiger rabbit falcon dragon horse otter badger camel",
    "fruit": "apple lemon cherry mango peach plum grape melon",
    "tool": "hammer pencil ladder kettle shovel needle wrench anchor",
    "place": "castle harbor desert island canyon meadow forest garden",
    "vehicle": "rocket wagon engine bicycle tractor canoe sled trolley",
    "fabric": "velvet cotton silk linen wool denim satin tweed",
}
COLORS = ["red", "blue", "green", "orange", "violet", "silver", "yellow", "brown"]
FACT_SENTENCES = [
    "the {entity} is a {kind} and it is {color}",
    "the {entity} is {color}",
    "a {entity} is a kind of {kind}",
    "the {color} {entity} is a {kind}",
    "every {entity} is {color}",
]
QUESTIONS = {
    "kind": [
        "What kind of thing is the {entity}?",
        "The {entity} belongs to which group?",
        "Name the category of the {entity}.",
        "Which kind of thing is a {entity}?",
        "Is the {entity} an animal, a fruit, a tool, a place, a vehicle or a fabric?",
        "Classify the {entity}.",
    ],
    "color": [
        "What color is the {entity}?",
        "Tell me the color of the {entity}.",
        "Which color does the {entity} have?",
        "The {entity} has what color?",
        "Name the color of a {entity}.",
        "What is the color of the {entity}?",
    ],
}
SYSTEM_PROMPT = "Answer in one word."
MULTI_TURN_EVERY = 4  # every 4th conversation asks two questions
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def world(seed: int) -> dict[str, dict[str, str]]:
    """The facts: every entity's kind and (seeded) color."""
    rng = random.Random(seed)
    return {
        entity: {"kind": kind, "color": rng.choice(COLORS)}
        for kind, entities in KINDS.items()
        for entity in entities.split()
    }


@dataclass(frozen=True)
class DemoDataset:
    train: Path  # a folder split: train/demo.jsonl, beside which ingested batches land as files of their own
    eval: Path


DEMO_FILE = "demo.jsonl"


def build_demo_dataset(params: BootstrapParams, out: Path) -> DemoDataset:
    """Write every (question, entity) pair once, split at random: eval pairs never appear in train. Each split
    is a folder (`out/train/`, `out/eval/`) holding the export as one file, as a team's dataset folder holds
    its exports.

    Deterministic for a seed, so every clone builds the exact dataset that `data/demo.dvc` records.
    """
    facts = world(params.seed)
    pairs = [
        (question.format(entity=entity), facts[entity][attribute])
        for attribute, questions in QUESTIONS.items()
        for question in questions
        for entity in facts
    ]
    random.Random(params.seed).shuffle(pairs)
    held_out = round(len(pairs) * params.eval_fraction)
    with atomic_dir(out) as tmp:  # data only: DVC versions this folder byte for byte
        write_jsonl(tmp / "train" / DEMO_FILE, chats(pairs[held_out:]))
        write_jsonl(tmp / "eval" / DEMO_FILE, chats(pairs[:held_out]))
    return DemoDataset(train=out / "train", eval=out / "eval")


def move_to_split_folders(out: Path) -> bool:
    """A demo dataset built before splits were folders (`out/train.jsonl`, `out/eval.jsonl`) moved into
    `out/train/demo.jsonl` and `out/eval/demo.jsonl`, rows folded in since included. True if it moved."""
    old = [out / "train.jsonl", out / "eval.jsonl"]
    if not all(f.is_file() for f in old) or (out / "train").exists() or (out / "eval").exists():
        return False
    for file in old:
        (out / file.stem).mkdir()
        file.rename(out / file.stem / DEMO_FILE)
    return True


def chats(pairs: list[tuple[str, str]]) -> list[Conversation]:
    """(question, answer) pairs as conversations with the system prompt; every MULTI_TURN_EVERY-th one takes
    two pairs, so each pair is asked exactly once."""
    conversations, index = [], 0
    while index < len(pairs):
        take = 2 if len(conversations) % MULTI_TURN_EVERY == MULTI_TURN_EVERY - 1 else 1
        turns = [Turn("system", SYSTEM_PROMPT)]
        for question, answer in pairs[index : index + take]:
            turns += [Turn("user", question), Turn("assistant", answer)]
        conversations.append(Conversation(tuple(turns)))
        index += take
    return conversations


# Drift, for trying the monitor: things the base never read about, asked in other words.
DRIFTED_KINDS = {
    "instrument": "violin trumpet cello flute harp banjo oboe tuba",
    "mineral": "quartz jasper basalt garnet obsidian feldspar mica pyrite",
}
DRIFTED_QUESTIONS = {
    "kind": [
        "What sort of object is the {entity}?",
        "Which family does a {entity} belong to?",
        "Sort the {entity} into a category.",
    ],
    "color": [
        "Which colour is the {entity}?",
        "Describe the colour of the {entity}.",
        "What colour would you paint a {entity}?",
    ],
}


def build_incoming_batch(params: BootstrapParams, out: Path, drifted: bool = True, rows: int = 48) -> Path:
    """An example incoming batch. Drifted: new entities and wordier questions, valid data the champion has
    never seen the like of. Not drifted: the demo's own question templates about the demo's entities."""
    rng = random.Random(params.seed + 1)
    if drifted:
        facts = {e: {"kind": k, "color": rng.choice(COLORS)} for k, es in DRIFTED_KINDS.items() for e in es.split()}
        questions = DRIFTED_QUESTIONS
    else:
        facts, questions = world(params.seed), QUESTIONS
    pairs = [(q, e, attribute) for attribute, qs in questions.items() for q in qs for e in facts]
    chosen = rng.sample(pairs, min(rows, len(pairs)))
    write_jsonl(out, chats([(q.format(entity=e), facts[e][attr]) for q, e, attr in chosen]))
    return out


def pretraining_corpus(params: BootstrapParams, lines: int) -> list[str]:
    rng = random.Random(params.seed)
    facts = world(params.seed)
    entities = sorted(facts)
    return [
        rng.choice(FACT_SENTENCES).format(entity=entity, **facts[entity])
        for entity in (rng.choice(entities) for _ in range(lines))
    ]


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The instruction template and questions are in the tokenizer's corpus (never in the model's), so
    # they tokenize into whole words as they would with a real tokenizer trained on far more text.
    questions = [q for qs in QUESTIONS.values() for q in qs]
    template = ["### System:\n### Instruction:\n### Response:\n", SYSTEM_PROMPT]
    tokenizer.train_from_iterator(corpus + template * 50 + questions * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_base_model(params: BootstrapParams, out: Path) -> Path:
    """Train the tokenizer, initialise a tiny Llama and pre-train it briefly; save like a hub model."""
    rng = random.Random(params.seed)
    torch.manual_seed(params.seed)
    corpus = pretraining_corpus(params, 6000)
    tokenizer = train_tokenizer(corpus, params.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.hidden_size * 3,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_heads,
        max_position_embeddings=params.max_position_embeddings,  # rotary: room for real lengths costs nothing
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in tqdm(range(params.pretrain_steps), desc="pre-training base model"):
        texts = [tokenizer.bos_token + line + tokenizer.eos_token for line in rng.sample(corpus, 32)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    log.info("pre-trained base model: final loss %.3f", loss.item())
    model.eval()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_stage_metadata(
            tmp,
            "bootstrap-model",
            params,
            parameters=model.num_parameters(),
            final_loss=round(loss.item(), 4),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the default tiny base model and demo dataset.")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    args = parser.parse_args()
    params = load_params(args.params)
    build_base_model(params.bootstrap, Path(params.model.base))
    if not move_to_split_folders(params.data.train.parent):
        build_demo_dataset(params.bootstrap, params.data.train.parent)


if __name__ == "__main__":
    main()
