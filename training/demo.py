"""Builds the offline demo: a tiny Llama model, its byte-level BPE tokenizer and sample datasets.

Nothing here touches a model hub. Everything is generated from a fixed seed, so every machine
builds the same tokenizer, the same weights and the same JSONL files.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Qwen2's pre-tokenizer split: digits one by one, words with their leading space.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_COUNTRIES = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
    ("India", "New Delhi"),
    ("Greece", "Athens"),
    ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
]
_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
_ANIMALS = ["cat", "dog", "horse", "owl", "fox", "whale", "bee", "frog"]
_SYSTEM = "You are a helpful, concise assistant."


def _qa_pair(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(20), rng.randrange(20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        country, capital = rng.choice(_COUNTRIES)
        return f"What is the capital of {country}?", f"The capital of {country} is {capital}."
    if kind == 2:
        words = rng.sample(_ANIMALS, 3)
        return f"Reverse the list: {', '.join(words)}.", f"Reversed: {', '.join(reversed(words))}."
    color, animal = rng.choice(_COLORS), rng.choice(_ANIMALS)
    return f"Describe a {color} {animal} in one sentence.", f"A {color} {animal} is a {animal} whose colour is {color}."


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": _SYSTEM}] if rng.random() < 0.5 else []
        for _turn in range(rng.choice([1, 1, 2])):
            q, a = _qa_pair(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": messages})
    return rows


def alpaca_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = _qa_pair(rng)
        if rng.random() < 0.3:
            rows.append({"instruction": "Answer the question.", "input": q, "output": a})
        else:
            rows.append({"instruction": q, "input": "", "output": a})
    return rows


def completion_rows(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(" ".join(_qa_pair(rng)) for _ in range(rng.randint(1, 3)))} for _ in range(n)]


def input_output_rows(n: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = _qa_pair(rng)
        rows.append(
            {
                "segments": [
                    {"label": False, "text": f"Question: {q}\n"},
                    {"label": True, "text": f"Answer: {a}"},
                ]
            }
        )
    return rows


DATASETS = {
    "chat.jsonl": chat_rows,
    "alpaca.jsonl": alpaca_rows,
    "completion.jsonl": completion_rows,
    "input_output.jsonl": input_output_rows,
}


def write_datasets(out_dir: Path, rows_per_file: int = 300) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in DATASETS.items():
        path = out_dir / name
        with path.open("w", encoding="utf-8") as f:
            for row in make(rows_per_file):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def _corpus() -> list[str]:
    """Text the tokenizer learns from: the demo data itself, rendered as the model will see it."""
    texts = []
    for make in DATASETS.values():
        for row in make(400, seed=99):
            texts.append(json.dumps(row))
            texts.extend(str(v) for v in row.values() if isinstance(v, str))
    for row in chat_rows(400, seed=98):
        texts.extend(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"])
    # Alpaca's prompt words, so prompts are not spelled out byte by byte.
    texts += [
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n### Input:\n### Response:\n"
    ] * 20
    return texts


def byte_level_bpe(vocab_size: int, special_tokens: list[str] | None = None):
    """A byte-level BPE (Qwen2's pre-tokenizer split) trained on the shipped corpus: the same on every machine."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens or [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def build_tokenizer(vocab_size: int = 4096):
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(vocab_size, SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # 0.1 instead of 0.02: with tiny random embeddings LoRA barely moves the loss.
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def build_demo_model(out_dir: Path) -> Path:
    """Write a loadable model folder (config, weights, tokenizer). Idempotent."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    # Build beside the target and rename, so a half-written folder is never mistaken for a model.
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
