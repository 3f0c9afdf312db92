"""Training overhead: the same LoRA config through Trainyard's runner (training.train: our encoder,
collator, event callback) and through a plain script calling HF Trainer, in one process.
Prints tokens/s for each and their ratio (goal >= 0.97), then one line of JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from training.config import parse_config  # noqa: E402
from training.demo import build_demo_model, write_datasets  # noqa: E402
from training.events import ListEventSink  # noqa: E402
from training.train import train  # noqa: E402


def trainyard_tokens_per_s(config, run_dir) -> float:
    sink = ListEventSink()
    train(config, run_dir, sink)
    tokens = sum(
        e["values"].get("tokens_per_second", 0) * e["values"].get("seconds_per_step", 0)
        for e in sink.events
        if e["event"] == "metric" and "loss" in e["values"]
    )
    runtime = next(e["values"]["train_runtime"] for e in sink.events if "train_runtime" in e.get("values", {}))
    return tokens / runtime


def plain_tokens_per_s(model_dir: Path, data: Path, steps: int, batch: int, lr: float, out: Path) -> float:
    """What a user would write by hand: tokenize the chat template, pad per batch, LoRA, Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    torch.set_num_threads(int(os.environ.get("TRAINYARD_CPU_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    features = []
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        features.append({"input_ids": list(ids), "labels": list(ids)})
    seen = {"tokens": 0}

    def collate(batch):
        width = max(len(f["input_ids"]) for f in batch)
        seen["tokens"] += sum(len(f["input_ids"]) for f in batch)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in batch]),
            "labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in batch]),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in batch]
            ),
        }

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=42,
    )
    result = Trainer(model=model, args=args, train_dataset=features, data_collator=collate).train()
    return seen["tokens"] / result.metrics["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model_dir = build_demo_model(tmp / "tiny-chat")
    data = write_datasets(tmp / "data", rows_per_file=600)[0]
    config = parse_config(
        {
            "base_model": str(model_dir),
            "datasets": [{"path": str(data), "type": "chat_template"}],
            "sequence_len": 256,
            "adapter": "lora",
            "lora_target_linear": True,
            "micro_batch_size": 4,
            "max_steps": args.steps,
            "learning_rate": 3e-3,
            "seed": 42,
        }
    )
    ours, plain = [], []
    for i in range(args.repeats):  # interleaved, best of each: the machine is noisy
        plain.append(plain_tokens_per_s(model_dir, data, args.steps, 4, 3e-3, tmp / f"plain{i}"))
        ours.append(trainyard_tokens_per_s(config, tmp / f"ours{i}"))
    figures = {
        "steps": args.steps,
        "plain_tokens_per_s": round(max(plain)),
        "trainyard_tokens_per_s": round(max(ours)),
        "ratio": round(max(ours) / max(plain), 3),
        "goal": 0.97,
    }
    print(f"plain HF Trainer: {figures['plain_tokens_per_s']} tokens/s")
    print(f"Trainyard runner: {figures['trainyard_tokens_per_s']} tokens/s")
    print(f"ratio {figures['ratio']} (goal >= 0.97)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
