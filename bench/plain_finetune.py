"""The baseline for the finetune throughput benchmark: a plain transformers + peft LoRA script, the way one
would write it without a platform. Same model, data, prompt format, loss masking and hyper-parameters as the
finetune stage; no subprocess launcher, checkpoints, logs streaming or adapter checks.

Usage: python bench/plain_finetune.py MODEL TRAIN.jsonl OUT_DIR PARAMS_JSON
Prints one JSON line: {"tokens": N, "train_seconds": S}.
"""

import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

model_path, train_file, out_dir, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(model_path)
rows = []
for line in Path(train_file).read_text().splitlines():
    example = json.loads(line)
    prompt = [tokenizer.bos_token_id] + tokenizer(
        f"### Instruction:\n{example['prompt']}\n### Response:\n", add_special_tokens=False
    )["input_ids"]
    response = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + response)[: config["max_seq_len"]]
    rows.append({"input_ids": ids, "labels": ([-100] * len(prompt) + response)[: config["max_seq_len"]]})

tokens = 0


def collate(batch):
    global tokens
    tokens += sum(len(row["input_ids"]) for row in batch)
    width = max(len(row["input_ids"]) for row in batch)
    pad = lambda values, fill: [v + [fill] * (width - len(v)) for v in values]  # noqa: E731
    return {
        "input_ids": torch.tensor(pad([r["input_ids"] for r in batch], tokenizer.pad_token_id)),
        "labels": torch.tensor(pad([r["labels"] for r in batch], -100)),
        "attention_mask": torch.tensor(pad([[1] * len(r["input_ids"]) for r in batch], 0)),
    }


model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
set_seed(config["seed"])
model = get_peft_model(
    model,
    LoraConfig(
        r=config["r"], lora_alpha=config["alpha"], target_modules=config["target_modules"], task_type="CAUSAL_LM"
    ),
)
steps = max(1, round(-(-len(rows) // config["batch_size"]) * config["epochs"]))
args = TrainingArguments(
    output_dir=out_dir,
    per_device_train_batch_size=config["batch_size"],
    max_steps=steps,
    learning_rate=config["learning_rate"],
    lr_scheduler_type="linear",
    warmup_steps=int(steps * config["warmup_ratio"]),
    save_strategy="no",
    report_to=[],
    seed=config["seed"],
    use_cpu=not torch.cuda.is_available(),
    remove_unused_columns=False,
    disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
started = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - started
model.save_pretrained(out_dir)
print(json.dumps({"tokens": tokens, "train_seconds": seconds}))
